//! `--bwlimit`: a token bucket per key, shared by every stripe of every
//! pull that names the key (a relocation, a site pair). The receiver takes
//! tokens for each frame before it reads the next one, so TCP's own flow
//! control slows the sender: nothing is dropped, nothing piles up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// One bucket: `rate` bytes per second, bursts of a quarter second.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A bucket of `rate` bytes per second (at least 1 KiB/s).
    pub fn new(rate: u64) -> Self {
        let rate = rate.max(1024);
        Self {
            rate,
            state: Mutex::new((rate as f64 / 4.0, Instant::now())),
        }
    }

    /// The rate.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `n` bytes' worth of tokens, waiting until the bucket has
    /// them (a debt is paid by later callers' waits).
    pub async fn take(&self, n: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let burst = self.rate as f64 / 4.0;
            let refill = now.duration_since(s.1).as_secs_f64() * self.rate as f64;
            s.0 = (s.0 + refill).min(burst) - n as f64;
            s.1 = now;
            if s.0 >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-s.0 / self.rate as f64)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The buckets of an agent, by key.
#[derive(Debug, Default)]
pub struct Limits {
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
}

impl Limits {
    /// The bucket for `key` at `rate`; a new rate replaces the key's old
    /// bucket for pulls that start from now on.
    pub fn bucket(&self, key: &str, rate: u64) -> Arc<Bucket> {
        let mut b = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match b.get(key) {
            Some(bucket) if bucket.rate() == rate.max(1024) => bucket.clone(),
            _ => {
                let bucket = Arc::new(Bucket::new(rate));
                b.insert(key.to_owned(), bucket.clone());
                bucket
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bucket_holds_its_rate() {
        let b = Bucket::new(4 << 20);
        let start = Instant::now();
        // 3 MiB at 4 MiB/s, after a 1 MiB burst: about half a second.
        for _ in 0..48 {
            b.take(64 << 10).await;
        }
        // A lower bound only: a busy machine may be slower, never faster.
        let t = start.elapsed().as_secs_f64();
        assert!(t >= 0.45, "{t} s");
    }
}
