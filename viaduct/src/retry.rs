//! Retry policy as data, and the pure function that applies it.

use std::time::Duration;

use fluidcloud_plugins::{Retry, Retryable};
use serde::{Deserialize, Serialize};

/// Exponential backoff with jitter and a bound on attempts.
///
/// The delay before attempt `n + 1`, after `n` failed attempts, is
/// `min(initial * multiplier^(n-1), max_delay)`, reduced by up to
/// `jitter` (a fraction) so that steps failing together do not retry in
/// lock-step. An error classified [`Retry::After`] waits at least what it
/// asks for; [`Retry::Never`] is never retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = never retry).
    pub max_attempts: u32,
    /// Delay after the first failure, in milliseconds.
    pub initial_ms: u64,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Upper bound of a delay, in milliseconds.
    pub max_delay_ms: u64,
    /// Fraction (0..=1) of the delay that is randomised away.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_ms: 500,
            multiplier: 2.0,
            max_delay_ms: 60_000,
            jitter: 0.2,
        }
    }
}

/// SplitMix64: a well-mixed hash of `x`, for deterministic jitter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before the next attempt after `attempt` (1-based) attempts
    /// failed, the last with `error`; `None` when the step must fail.
    ///
    /// Pure: the jitter is derived from `attempt`, so the same inputs give
    /// the same delay. [`RetryPolicy::next_delay_keyed`] spreads steps.
    pub fn next_delay(&self, attempt: u32, error: &dyn Retryable) -> Option<Duration> {
        self.next_delay_keyed(attempt, error, 0)
    }

    /// As [`RetryPolicy::next_delay`], the jitter also depending on `key`
    /// (the executor passes the step index).
    pub fn next_delay_keyed(
        &self,
        attempt: u32,
        error: &dyn Retryable,
        key: u64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let floor = match error.retry() {
            Retry::Never => return None,
            Retry::Transient => Duration::ZERO,
            Retry::After(d) => d,
        };
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = (self.initial_ms as f64 * self.multiplier.max(1.0).powi(exp))
            .min(self.max_delay_ms as f64);
        let u = (mix(mix(key) ^ u64::from(attempt)) >> 11) as f64 / (1u64 << 53) as f64;
        let jittered = base * (1.0 - self.jitter.clamp(0.0, 1.0) * u);
        let backoff = Duration::from_millis(jittered.round() as u64);
        Some(backoff.max(floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluidcloud_plugins::Error;

    fn transient() -> Error {
        Error::Transient("blip".into())
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_without_jitter() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 1000,
            jitter: 0.0,
        };
        let d: Vec<u64> = (1..10)
            .map(|a| p.next_delay(a, &transient()).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000, 1000, 1000, 1000]);
        assert_eq!(p.next_delay(10, &transient()), None, "attempts exhausted");
    }

    #[test]
    fn the_errors_classification_decides() {
        let p = RetryPolicy::default();
        assert_eq!(p.next_delay(1, &Error::Precondition("no".into())), None);
        let after = Error::Io {
            context: "x".into(),
            source: std::io::ErrorKind::TimedOut.into(),
        };
        assert!(p.next_delay(1, &after).is_some());
        struct AskWait;
        impl Retryable for AskWait {
            fn retry(&self) -> Retry {
                Retry::After(Duration::from_secs(30))
            }
        }
        assert_eq!(p.next_delay(1, &AskWait), Some(Duration::from_secs(30)));
        assert_eq!(RetryPolicy::never().next_delay(1, &transient()), None);
    }

    #[test]
    fn jitter_stays_in_bounds_is_deterministic_and_spreads_keys() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for key in 0..200 {
            let d = p.next_delay_keyed(2, &transient(), key).unwrap();
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
            assert_eq!(d, p.next_delay_keyed(2, &transient(), key).unwrap());
            seen.insert(d);
        }
        assert!(
            seen.len() > 100,
            "jitter should spread delays: {}",
            seen.len()
        );
    }

    #[test]
    fn policy_is_data() {
        let p: RetryPolicy = serde_json::from_str(r#"{"max_attempts": 3, "jitter": 0}"#).unwrap();
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.initial_ms, 500);
        assert!(serde_json::from_str::<RetryPolicy>(r#"{"max_attemps": 3}"#).is_err());
    }
}
