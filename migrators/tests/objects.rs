//! `objects::copy_bucket` and the `object-copy` migrator against two real
//! Garage S3 servers started by `scripts/garage`, and local directories.
//!
//! Garage must be installed (`scripts/setup`); without it these tests fail,
//! they never skip.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fluidcloud_migrators::ObjectCopy;
use fluidcloud_migrators::objects::{
    self, BucketLocation, META_BLAKE3, ObjectCopyOptions, Verify, copy_bucket, manifest, open_store,
};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, ExecContext, Migrator, NoProgress, ProgressSink, Retry, Retryable,
    StepRequest,
};
use fluidcloud_testkit::Garage;
use object_store::path::Path as OPath;
use object_store::{Attribute, Attributes, ObjectStoreExt, PutOptions, PutPayload};

/// The run's shared Garage pair, its variables exported as `GARAGE_*`.
fn garage() -> &'static Garage {
    static READY: OnceLock<&'static Garage> = OnceLock::new();
    READY.get_or_init(|| {
        // Our clients must not depend on CA bundle settings (plain http).
        // SAFETY: runs once, before any test reads these.
        unsafe {
            std::env::set_var("AWS_CA_BUNDLE", "/nonexistent/ca.pem");
            std::env::set_var("SSL_CERT_FILE", "/nonexistent/ca.pem");
        }
        let g = Garage::shared();
        g.export("GARAGE");
        g
    })
}

/// Bucket `name` of this test process: the pair is shared by every test
/// of the run, so names carry the process id.
fn bucket_name(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

/// Creates bucket `name` (of this process) on `inst`.
fn make_bucket(inst: &str, name: &str) {
    garage().bucket(inst, &bucket_name(name));
}

fn url(inst: &str, bucket: &str) -> String {
    garage().url("GARAGE", inst, &bucket_name(bucket))
}

fn loc(url: &str) -> BucketLocation {
    BucketLocation::parse(url).unwrap()
}

/// Deterministic pseudo-random bytes.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Fills a location with `n` objects of 1–40 KiB under nested keys.
async fn fill(location: &str, n: u64) {
    let store = open_store(&loc(location)).unwrap();
    for i in 0..n {
        let key = format!("dir{}/obj-{i:04}.bin", i % 3);
        let len = 1024 + (i as usize * 7919) % (40 * 1024);
        store
            .put(&OPath::from(key), PutPayload::from(data(i, len)))
            .await
            .unwrap();
    }
}

fn tempdir_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn quiet() -> Arc<dyn ProgressSink> {
    Arc::new(NoProgress)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_to_file_copies_and_manifests_match() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    fill(&tempdir_url(&src), 25).await;
    let (s, d) = (loc(&tempdir_url(&src)), loc(&tempdir_url(&dst)));
    let sum = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((sum.objects, sum.copied, sum.skipped), (25, 25, 0));
    assert!(sum.failures.is_empty(), "{:?}", sum.failures);
    assert!(sum.created_bucket);
    let (ms, md) = (manifest(&s).await.unwrap(), manifest(&d).await.unwrap());
    assert_eq!(ms.digest, md.digest);
    assert_eq!(sum.manifest, ms.digest);
    assert_eq!(
        std::fs::read(src.join("dir1/obj-0004.bin")).unwrap(),
        std::fs::read(dst.join("dir1/obj-0004.bin")).unwrap()
    );
    let again = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((again.copied, again.skipped), (0, 25));
    assert_eq!(again.manifest, ms.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_to_garage_then_a_second_run_skips_everything() {
    let tmp = tempfile::tempdir().unwrap();
    fill(&tempdir_url(tmp.path()), 30).await;
    let s = loc(&tempdir_url(tmp.path()));
    // The target bucket does not exist yet: the copy creates it.
    let d = loc(&url("A", "from-files"));
    let sum = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((sum.copied, sum.skipped, sum.failures.len()), (30, 0, 0));
    assert!(sum.created_bucket);
    assert_eq!(manifest(&d).await.unwrap().digest, sum.manifest);
    let again = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((again.copied, again.skipped), (0, 30));
    assert_eq!(again.bytes_written, 0);
    assert!(!again.created_bucket);
    assert_eq!(again.manifest, sum.manifest);
}

async fn put_with_attributes(location: &str, key: &str, body: Vec<u8>) {
    let store = open_store(&loc(location)).unwrap();
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, "image/png".into());
    attributes.insert(Attribute::CacheControl, "max-age=60".into());
    attributes.insert(Attribute::Metadata("owner".into()), "team-blue".into());
    store
        .put_opts(
            &OPath::from(key),
            PutPayload::from(body),
            PutOptions {
                attributes,
                ..PutOptions::default()
            },
        )
        .await
        .unwrap();
}

async fn attributes_of(location: &str, key: &str) -> Attributes {
    let store = open_store(&loc(location)).unwrap();
    store.get(&OPath::from(key)).await.unwrap().attributes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_a_to_garage_b_preserves_content_type_and_metadata() {
    make_bucket("A", "meta-src");
    put_with_attributes(&url("A", "meta-src"), "logo.png", data(7, 5000)).await;
    fill(&url("A", "meta-src"), 10).await;
    let (s, d) = (loc(&url("A", "meta-src")), loc(&url("B", "meta-dst")));
    let opts = ObjectCopyOptions {
        verify: Verify::Reread,
        ..ObjectCopyOptions::default()
    };
    let sum = copy_bucket(&s, &d, &opts, quiet()).await.unwrap();
    assert_eq!(
        (sum.copied, sum.server_side),
        (11, 0),
        "different servers stream"
    );
    assert_eq!(sum.bytes_written, sum.bytes_total);
    let attrs = attributes_of(&url("B", "meta-dst"), "logo.png").await;
    assert_eq!(
        attrs.get(&Attribute::ContentType).unwrap().as_ref(),
        "image/png"
    );
    assert_eq!(
        attrs.get(&Attribute::CacheControl).unwrap().as_ref(),
        "max-age=60"
    );
    assert_eq!(
        attrs
            .get(&Attribute::Metadata("owner".into()))
            .unwrap()
            .as_ref(),
        "team-blue"
    );
    let b3 = blake3::hash(&data(7, 5000)).to_hex().to_string();
    assert_eq!(
        attrs
            .get(&Attribute::Metadata(META_BLAKE3.into()))
            .unwrap()
            .as_ref(),
        b3
    );
    assert_eq!(
        manifest(&s).await.unwrap().digest,
        manifest(&d).await.unwrap().digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_server_copies_server_side() {
    make_bucket("A", "ss-src");
    put_with_attributes(&url("A", "ss-src"), "logo.png", data(9, 3000)).await;
    fill(&url("A", "ss-src"), 12).await;
    // 20 MiB with a low part-copy threshold exercises UploadPartCopy too.
    let big = data(11, 20 << 20);
    open_store(&loc(&url("A", "ss-src")))
        .unwrap()
        .put(&OPath::from("big.bin"), PutPayload::from(big.clone()))
        .await
        .unwrap();
    let (s, d) = (loc(&url("A", "ss-src")), loc(&url("A", "ss-dst")));
    let opts = ObjectCopyOptions {
        server_side_part_threshold: 8 << 20,
        part_size: 5 << 20,
        ..ObjectCopyOptions::default()
    };
    let sum = copy_bucket(&s, &d, &opts, quiet()).await.unwrap();
    assert!(sum.failures.is_empty(), "{:?}", sum.failures);
    assert_eq!((sum.copied, sum.server_side), (14, 14));
    assert_eq!(sum.bytes_written, 0, "no data goes through the client");
    let attrs = attributes_of(&url("A", "ss-dst"), "logo.png").await;
    assert_eq!(
        attrs.get(&Attribute::ContentType).unwrap().as_ref(),
        "image/png"
    );
    let got = open_store(&d)
        .unwrap()
        .get(&OPath::from("big.bin"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.as_ref() == big.as_slice(), "part-copied object differs");
    assert_eq!(manifest(&d).await.unwrap().digest, sum.manifest);
    // Now everything carries its BLAKE3: a re-run skips without hashing.
    let again = copy_bucket(&s, &d, &opts, quiet()).await.unwrap();
    assert_eq!((again.copied, again.skipped), (0, 14));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_goes_up_in_parts_and_is_byte_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let big = data(3, 80 << 20);
    std::fs::write(tmp.path().join("disk.img"), &big).unwrap();
    std::fs::write(tmp.path().join("small.txt"), b"hello").unwrap();
    let s = loc(&tempdir_url(tmp.path()));
    let a = loc(&url("A", "large-a"));
    let sum = copy_bucket(&s, &a, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert!(sum.failures.is_empty(), "{:?}", sum.failures);
    assert_eq!(sum.copied, 2);
    // Garage A to Garage B: ranged parallel reads of a multipart source.
    let b = loc(&url("B", "large-b"));
    let sum2 = copy_bucket(&a, &b, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert!(sum2.failures.is_empty(), "{:?}", sum2.failures);
    assert_eq!(sum2.manifest, sum.manifest);
    let got = open_store(&b)
        .unwrap()
        .get(&OPath::from("disk.img"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got.as_ref() == big.as_slice(), "multipart copy differs");
    let attrs = attributes_of(&url("B", "large-b"), "disk.img").await;
    assert_eq!(
        attrs
            .get(&Attribute::Metadata(META_BLAKE3.into()))
            .unwrap()
            .as_ref(),
        blake3::hash(&big).to_hex().as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_object_changed_behind_our_back_is_copied_again() {
    let tmp = tempfile::tempdir().unwrap();
    fill(&tempdir_url(tmp.path()), 8).await;
    let s = loc(&tempdir_url(tmp.path()));
    let d_url = url("B", "tamper");
    let d = loc(&d_url);
    let first = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!(first.copied, 8);
    let store = open_store(&d).unwrap();
    // Same size, other bytes, no metadata.
    let k1 = OPath::from("dir0/obj-0000.bin");
    let len1 = store.head(&k1).await.unwrap().size as usize;
    store
        .put(&k1, PutPayload::from(vec![0u8; len1]))
        .await
        .unwrap();
    // Same size, other bytes, but our metadata copied along (a forgery the
    // stored MD5 catches).
    let k2 = OPath::from("dir1/obj-0001.bin");
    let old = store.get(&k2).await.unwrap();
    let attributes = old.attributes.clone();
    let len2 = old.meta.size as usize;
    store
        .put_opts(
            &k2,
            PutPayload::from(vec![1u8; len2]),
            PutOptions {
                attributes,
                ..PutOptions::default()
            },
        )
        .await
        .unwrap();
    assert_ne!(manifest(&d).await.unwrap().digest, first.manifest);
    let again = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((again.copied, again.skipped), (2, 6));
    assert_eq!(manifest(&d).await.unwrap().digest, first.manifest);
}

/// Counts finished objects and, at `at`, runs a closure once.
struct Trigger {
    done: AtomicU64,
    at: u64,
    fire: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl ProgressSink for Trigger {
    fn progress(&self, _done: u64, _total: Option<u64>) {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 == self.at
            && let Some(f) = self.fire.lock().unwrap().take()
        {
            f();
        }
    }
    fn message(&self, _text: &str) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_restarting_mid_copy_still_gets_every_object_verified() {
    // Its own pair: stopping B must not disturb the other tests.
    let g = Arc::new(Garage::private("objects-fault"));
    g.export("FAULTGARAGE");
    g.bucket("A", "fault-src");
    let src_url = g.url("FAULTGARAGE", "A", "fault-src");
    fill(&src_url, 300).await;
    let s = loc(&src_url);
    let d = loc(&g.url("FAULTGARAGE", "B", "fault-dst"));
    // The target bucket exists up front so the restart hits object copies.
    g.bucket("B", "fault-dst");
    let pair = Arc::clone(&g);
    let restarted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&restarted);
    let trigger = Arc::new(Trigger {
        done: AtomicU64::new(0),
        at: 40,
        fire: std::sync::Mutex::new(Some(Box::new(move || {
            pair.stop_one("B");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(3));
                pair.start_one("B");
                flag.store(true, Ordering::SeqCst);
            });
        }))),
    });
    let opts = ObjectCopyOptions {
        concurrency: 4,
        ..ObjectCopyOptions::default()
    };
    let sum = copy_bucket(&s, &d, &opts, trigger.clone()).await.unwrap();
    assert!(
        trigger.fire.lock().unwrap().is_none(),
        "the fault was never injected"
    );
    assert!(restarted.load(Ordering::SeqCst) || sum.failures.is_empty());
    assert!(
        sum.failures.is_empty(),
        "{:?}",
        &sum.failures[..sum.failures.len().min(3)]
    );
    assert_eq!(sum.copied, 300);
    assert_eq!(
        manifest(&d).await.unwrap().digest,
        manifest(&s).await.unwrap().digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_source_object_is_listed_and_the_rest_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), b"alpha").unwrap();
    std::fs::write(src.join("sub/b.txt"), b"beta").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), src.join("sub/broken.txt")).unwrap();
    let s = loc(&tempdir_url(&src));
    let d = loc(&tempdir_url(&tmp.path().join("dst")));
    let sum = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap();
    assert_eq!((sum.objects, sum.copied), (3, 2));
    assert_eq!(sum.failures.len(), 1);
    assert_eq!(sum.failures[0].key, "sub/broken.txt");
    assert!(!sum.failures[0].transient);
    assert_eq!(
        std::fs::read(tmp.path().join("dst/sub/b.txt")).unwrap(),
        b"beta"
    );
    // Through the migrator, the step fails naming the key, not retryable.
    let req = request(
        &tempdir_url(&src),
        &tempdir_url(&tmp.path().join("dst2")),
        tmp.path(),
    );
    let e = ObjectCopy
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sub/broken.txt"), "{e}");
    assert_eq!(e.retry(), Retry::Never);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_credential_variable_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let s = loc(&tempdir_url(tmp.path()));
    let d = loc(
        "s3://nokeys?endpoint=http://127.0.0.1:9&region=garage&access_key_id_env=FLUIDCLOUD_TEST_NO_SUCH_KEY&secret_access_key_env=FLUIDCLOUD_TEST_NO_SUCH_SECRET",
    );
    let e = copy_bucket(&s, &d, &ObjectCopyOptions::default(), quiet())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("FLUIDCLOUD_TEST_NO_SUCH_KEY"), "{e}");
    assert!(e.to_string().contains("not set"), "{e}");
}

#[test]
fn bad_urls_are_rejected_with_the_reason() {
    for (url, needle) in [
        ("http://bucket", "unknown scheme"),
        ("s3://Bad_Bucket", "not a valid bucket name"),
        ("s3://ok-bucket?secret=abc", "unknown parameter `secret`"),
        ("s3://key:secret@ok-bucket", "credentials do not belong"),
    ] {
        let e = BucketLocation::parse(url).unwrap_err().to_string();
        assert!(e.contains(needle), "{url}: {e}");
    }
    let req = request("file:///a", "s3://Bad_Bucket", Path::new("/tmp"));
    let d = ObjectCopy.validate(&req);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].key.as_deref(), Some("params.target"));
}

fn request(source: &str, target: &str, record_dir: &Path) -> StepRequest {
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "bucket".into(),
        Artifact {
            kind: ArtifactKind::Bucket,
            site: "old-site".into(),
            locator: source.into(),
            size: None,
            checksum: None,
        },
    );
    StepRequest {
        step_id: "copy-bucket-1".into(),
        params: serde_json::json!({
            "target": target,
            "record_dir": record_dir.join("records"),
            "concurrency": 16,
        }),
        inputs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migrator_copies_plans_and_rolls_back_only_what_it_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    fill(&tempdir_url(&src), 12).await;
    // The target bucket exists and already holds one identical object.
    make_bucket("B", "mig-existing");
    let t_url = url("B", "mig-existing");
    let pre = copy_bucket(
        &loc(&tempdir_url(&src)),
        &loc(&t_url),
        &ObjectCopyOptions::default(),
        quiet(),
    )
    .await
    .unwrap();
    assert_eq!(pre.copied, 12);
    let store = open_store(&loc(&t_url)).unwrap();
    for i in 1..12 {
        let key = format!("dir{}/obj-{i:04}.bin", i % 3);
        store.delete(&OPath::from(key)).await.unwrap();
    }
    let req = request(&tempdir_url(&src), &t_url, tmp.path());
    assert!(ObjectCopy.validate(&req).is_empty());
    let plan = ObjectCopy.plan(&req).await.unwrap();
    let src_manifest = manifest(&loc(&tempdir_url(&src))).await.unwrap();
    assert_eq!(plan.bytes_read, src_manifest.bytes());
    let out = ObjectCopy
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    let art = &out.artifacts["bucket"];
    assert_eq!(art.kind, ArtifactKind::Bucket);
    assert_eq!(art.locator, t_url);
    assert!(!art.locator.contains(garage().secret_access_key("B")));
    assert_eq!(art.checksum.as_deref(), Some(src_manifest.digest.as_str()));
    assert_eq!(art.size, Some(src_manifest.bytes()));
    assert!(out.measured.bytes_written > 0 && out.measured.bytes_written < src_manifest.bytes());
    // Re-running the step is safe and writes nothing.
    let again = ObjectCopy
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    assert_eq!(again.measured.bytes_written, 0);
    ObjectCopy
        .rollback(&req, Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    let left: Vec<String> = objects::manifest(&loc(&t_url))
        .await
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        left,
        vec!["dir0/obj-0000.bin".to_owned()],
        "only the pre-existing object stays"
    );

    // A bucket the step created goes away on rollback.
    let fresh = url("B", "mig-fresh");
    let req = request(&tempdir_url(&src), &fresh, tmp.path());
    ObjectCopy
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    ObjectCopy
        .rollback(&req, None, &ExecContext::quiet())
        .await
        .unwrap();
    let e = objects::usage(&loc(&fresh)).await.unwrap_err();
    assert!(e.to_string().contains("mig-fresh"), "{e}");
}
