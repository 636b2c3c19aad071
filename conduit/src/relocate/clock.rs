//! Moments the relocation steps observe, for a downtime measured as the
//! service sees it: from the last source instance seen stopped by its
//! driver to the last target instance seen running (and passing its boot
//! check).
//!
//! Each moment carries the monotonic clock with the boot it belongs to, so
//! two moments of one boot are subtracted on the monotonic clock (immune to
//! wall-clock steps), and the wall clock only when a resume crossed a
//! reboot.

use serde::{Deserialize, Serialize};

/// One observed instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moment {
    /// Wall clock, milliseconds since the Unix epoch.
    pub unix_ms: i64,
    /// `CLOCK_MONOTONIC`, nanoseconds.
    pub monotonic_ns: u64,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`); empty if
    /// unknown.
    pub boot_id: String,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl Moment {
    /// Now.
    pub fn now() -> Self {
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self {
            unix_ms,
            monotonic_ns: monotonic_ns(),
            boot_id: boot_id(),
        }
    }

    /// Seconds from `earlier` to `self` (negative if `self` is earlier).
    pub fn since(&self, earlier: &Moment) -> f64 {
        let same_boot = !self.boot_id.is_empty()
            && self.boot_id == earlier.boot_id
            && self.monotonic_ns > 0
            && earlier.monotonic_ns > 0;
        if same_boot {
            (self.monotonic_ns as f64 - earlier.monotonic_ns as f64) / 1e9
        } else {
            (self.unix_ms - earlier.unix_ms) as f64 / 1000.0
        }
    }

    /// As a step's fact.
    pub fn fact(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// From a step's fact.
    pub fn from_fact(v: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(v.clone()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Moment;

    #[test]
    fn moments_of_one_boot_use_the_monotonic_clock_and_others_the_wall_clock() {
        let a = Moment::now();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let b = Moment::now();
        let d = b.since(&a);
        assert!((0.029..1.0).contains(&d), "{d}");
        // A wall clock stepped back by an hour does not matter in one boot.
        let stepped = Moment {
            unix_ms: b.unix_ms - 3_600_000,
            ..b.clone()
        };
        assert!((stepped.since(&a) - d).abs() < 1e-9);
        // Across boots only the wall clock means anything.
        let other = Moment {
            boot_id: "another".into(),
            unix_ms: a.unix_ms + 2500,
            ..a.clone()
        };
        assert!((other.since(&a) - 2.5).abs() < 1e-9);
    }
}
