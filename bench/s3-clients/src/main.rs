//! Puts then gets one set of objects through one S3 client, and prints
//! one JSON line: the client, seconds to put, seconds to get (streamed,
//! every byte checked as it comes), bytes, and the process's peak resident
//! memory while putting (the bodies are in memory: one PUT each) and while
//! getting (what the client keeps of a stream).
//!
//! Usage: s3-clients CLIENT ENDPOINT REGION BUCKET SMALL SMALL_KIB LARGE LARGE_MIB
//! with CLIENT `object_store` or `aws-sdk-s3`, keys in AWS_ACCESS_KEY_ID and
//! AWS_SECRET_ACCESS_KEY; the bucket exists and is empty.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt as _;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, path::Path};

/// What a get hands each chunk of the stream to.
type Check = Box<dyn FnMut(&[u8]) + Send>;

/// Objects in flight at once, for both clients.
const PARALLEL: usize = 32;

/// Object `i`'s bytes, made as they are read: 8-byte words of a
/// xorshift sequence seeded by `i`.
struct Gen {
    x: u64,
    word: [u8; 8],
    at: usize,
}

impl Gen {
    fn new(i: usize) -> Self {
        Self {
            x: (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            word: [0; 8],
            at: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.at == 8 {
                self.x ^= self.x << 13;
                self.x ^= self.x >> 7;
                self.x ^= self.x << 17;
                self.word = self.x.to_le_bytes();
                self.at = 0;
            }
            *b = self.word[self.at];
            self.at += 1;
        }
    }

    /// Whether `got` is what comes next.
    fn matches(&mut self, got: &[u8]) -> bool {
        let mut want = vec![0u8; got.len()];
        self.fill(&mut want);
        want == got
    }
}

/// Object `i`'s bytes: `len` bytes that differ per object.
fn body(i: usize, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    Gen::new(i).fill(&mut v);
    Bytes::from(v)
}

trait Client: Send + Sync {
    fn put(&self, key: String, data: Bytes) -> futures::future::BoxFuture<'_, ()>;
    /// Streams object `key` into `check` chunk by chunk; its length.
    fn get(&self, key: String, check: Check) -> futures::future::BoxFuture<'_, usize>;
}

struct Os(Arc<dyn ObjectStore>);

impl Client for Os {
    fn put(&self, key: String, data: Bytes) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0
                .put(&Path::from(key), PutPayload::from(data))
                .await
                .expect("object_store put");
        })
    }
    fn get(&self, key: String, mut check: Check) -> futures::future::BoxFuture<'_, usize> {
        Box::pin(async move {
            let mut s = self
                .0
                .get(&Path::from(key))
                .await
                .expect("object_store get")
                .into_stream();
            let mut n = 0;
            while let Some(c) = s.next().await {
                let c = c.expect("object_store body");
                check(&c);
                n += c.len();
            }
            n
        })
    }
}

struct Sdk(aws_sdk_s3::Client, String);

impl Client for Sdk {
    fn put(&self, key: String, data: Bytes) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0
                .put_object()
                .bucket(&self.1)
                .key(key)
                .body(data.into())
                .send()
                .await
                .expect("aws-sdk-s3 put");
        })
    }
    fn get(&self, key: String, mut check: Check) -> futures::future::BoxFuture<'_, usize> {
        Box::pin(async move {
            let mut body = self
                .0
                .get_object()
                .bucket(&self.1)
                .key(key)
                .send()
                .await
                .expect("aws-sdk-s3 get")
                .body;
            let mut n = 0;
            while let Some(c) = body.next().await {
                let c = c.expect("aws-sdk-s3 body");
                check(&c);
                n += c.len();
            }
            n
        })
    }
}

/// Peak resident memory of this process, KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    assert_eq!(
        a.len(),
        9,
        "usage: s3-clients CLIENT ENDPOINT REGION BUCKET SMALL SMALL_KIB LARGE LARGE_MIB"
    );
    let (client, endpoint, region, bucket) = (&a[1], &a[2], &a[3], &a[4]);
    let n = |i: usize| a[i].parse::<usize>().expect("a number");
    let mut objects: Vec<(String, usize)> = (0..n(5))
        .map(|i| (format!("small/{i:05}"), n(6) << 10))
        .collect();
    objects.extend((0..n(7)).map(|i| (format!("large/{i:03}"), n(8) << 20)));
    let c: Arc<dyn Client> = match client.as_str() {
        "object_store" => Arc::new(Os(Arc::new(
            object_store::aws::AmazonS3Builder::from_env()
                .with_endpoint(endpoint)
                .with_region(region)
                .with_bucket_name(bucket)
                .with_allow_http(true)
                .with_virtual_hosted_style_request(false)
                .build()
                .expect("object_store client"),
        ))),
        "aws-sdk-s3" => {
            let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(region.clone()))
                .endpoint_url(endpoint)
                .load()
                .await;
            let s3 = aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(true)
                .build();
            Arc::new(Sdk(aws_sdk_s3::Client::from_conf(s3), bucket.clone()))
        }
        other => panic!("unknown client {other}"),
    };
    let bytes: usize = objects.iter().map(|(_, l)| l).sum();
    let t = Instant::now();
    futures::stream::iter(objects.iter().enumerate())
        .for_each_concurrent(PARALLEL, |(i, (k, l))| {
            let c = c.clone();
            async move { c.put(k.clone(), body(i, *l)).await }
        })
        .await;
    let put_s = t.elapsed().as_secs_f64();
    let put_rss = peak_rss_kib();
    // Resets the peak, so the get's is its own (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    futures::stream::iter(objects.iter().enumerate())
        .for_each_concurrent(PARALLEL, |(i, (k, l))| {
            let c = c.clone();
            async move {
                let ok = Arc::new(std::sync::atomic::AtomicBool::new(true));
                let mut g = Gen::new(i);
                let flag = ok.clone();
                let check = Box::new(move |c: &[u8]| {
                    if !g.matches(c) {
                        flag.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                let n = c.get(k.clone(), check).await;
                assert!(
                    n == *l && ok.load(std::sync::atomic::Ordering::Relaxed),
                    "{k} came back different"
                );
            }
        })
        .await;
    let get_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"client\":\"{client}\",\"put_s\":{put_s:.3},\"get_s\":{get_s:.3},\"bytes\":{bytes},\"put_rss_kib\":{put_rss},\"get_rss_kib\":{}}}",
        peak_rss_kib()
    );
}
