use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::ConfigError;

/// When a connection counts as unhealthy (I9–I11).
///
/// Two detectors, as in Envoy's outlier detection and Finagle's failure accrual:
/// - **consecutive failures**: `consecutive_failures` failures in a row (default 5) trip it; the
///   count is exactly the length of the trailing run of failures (I10);
/// - **failure ratio**: over the last `window` (default 10 s), `failures / calls >= failure_ratio`
///   (default 0.5) trips it, but only once at least `min_requests` calls (default 20) fall in the
///   window, so a single early failure never condemns a connection (I11).
///
/// A verdict of unhealthy is latched by the pool: such a connection is never handed out again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HealthPolicy {
    /// Failures in a row that make a connection unhealthy; `0` disables this detector.
    pub consecutive_failures: u32,
    /// Failure ratio in `(0, 1]` over the window that makes a connection unhealthy.
    pub failure_ratio: f64,
    /// Length of the sliding window of the ratio detector; at least 1 ms.
    pub window: Duration,
    /// Calls needed in the window before the ratio detector may fire; at least 1.
    pub min_requests: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
        }
    }
}

impl HealthPolicy {
    /// Checks the policy; see [`ConfigError`] for what is refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            return Err(ConfigError::FailureRatioOutOfRange {
                ratio: self.failure_ratio,
            });
        }
        if self.window < Duration::from_millis(1) {
            return Err(ConfigError::WindowTooShort {
                window: self.window,
            });
        }
        if self.min_requests == 0 {
            return Err(ConfigError::ZeroMinRequests);
        }
        Ok(())
    }

    /// The verdict for a connection with `consecutive` trailing failures and `(successes,
    /// failures)` in its window. Pure: the same inputs always give the same verdict.
    ///
    /// ```
    /// use keyed_pool::core::{HealthPolicy, Verdict};
    /// let p = HealthPolicy::default();
    /// assert_eq!(p.verdict(4, (0, 4)), Verdict::Healthy);
    /// assert!(p.verdict(5, (0, 5)).is_unhealthy());
    /// // 19 failures out of 19 calls: below the minimum volume of 20, so the ratio stays silent.
    /// assert_eq!(p.verdict(0, (0, 19)), Verdict::Healthy);
    /// assert!(p.verdict(0, (10, 10)).is_unhealthy());
    /// ```
    pub fn verdict(&self, consecutive: u32, (successes, failures): (u64, u64)) -> Verdict {
        if self.consecutive_failures > 0 && consecutive >= self.consecutive_failures {
            return Verdict::Unhealthy(UnhealthyReason::ConsecutiveFailures { count: consecutive });
        }
        let total = successes.saturating_add(failures);
        if total >= u64::from(self.min_requests)
            && total > 0
            && failures as f64 >= self.failure_ratio * total as f64
        {
            return Verdict::Unhealthy(UnhealthyReason::FailureRatio { failures, total });
        }
        Verdict::Healthy
    }
}

/// Whether a connection may be handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Fit for use.
    Healthy,
    /// Not to be handed out again; the next health sweep removes it.
    Unhealthy(UnhealthyReason),
}

impl Verdict {
    /// `true` for [`Verdict::Unhealthy`].
    pub fn is_unhealthy(&self) -> bool {
        matches!(self, Verdict::Unhealthy(_))
    }
}

/// Why a connection was judged unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnhealthyReason {
    /// The trailing run of failures reached the threshold.
    ConsecutiveFailures {
        /// Length of the run when it tripped.
        count: u32,
    },
    /// The failure ratio over the window reached the threshold with enough volume.
    FailureRatio {
        /// Failures in the window.
        failures: u64,
        /// Calls in the window.
        total: u64,
    },
    /// The transport is known closed (the connector's `is_open` said so, or `mark_closed`).
    Closed,
}

impl fmt::Display for UnhealthyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            Self::FailureRatio { failures, total } => {
                write!(f, "{failures} of {total} calls failed in the window")
            }
            Self::Closed => f.write_str("transport closed"),
        }
    }
}

impl std::error::Error for UnhealthyReason {}

/// Number of buckets of a [`HealthWindow`]: the window slides in steps of `window / 8`.
pub const WINDOW_BUCKETS: usize = 8;

const EPOCH_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// A lock-free sliding window of call outcomes for the ratio detector.
///
/// Each bucket is one `AtomicU64` holding `epoch:24 | successes:20 | failures:20`, updated with a
/// compare-and-swap, so a bucket is rotated and counted in one atomic step and no count is lost to a
/// race between rotation and increment. Counts saturate at 2^20 − 1 per bucket. Time enters as
/// microseconds since the connection's creation (`elapsed_us`); the window itself never reads a
/// clock.
///
/// The 24-bit epoch tag alone would alias after 2^24 bucket widths; two rules rule that out: when
/// the window rotates into a new bucket, every bucket that has aged out is cleared (a CAS on the
/// exact stale word, so a concurrent fresh count is never lost), and a read more than a window after
/// the last record sees nothing. So every non-empty bucket a read looks at is less than two windows
/// old, far inside the tag's range.
#[derive(Debug)]
pub struct HealthWindow {
    buckets: [AtomicU64; WINDOW_BUCKETS],
    /// Full (untruncated) epoch of the latest record.
    last_epoch: AtomicU64,
}

impl Default for HealthWindow {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            last_epoch: AtomicU64::new(0),
        }
    }
}

fn bucket_width_us(window: Duration) -> u64 {
    let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    (us / WINDOW_BUCKETS as u64).max(1)
}

fn unpack(word: u64) -> (u64, u64, u64) {
    (
        word >> (2 * COUNT_BITS),
        (word >> COUNT_BITS) & COUNT_MASK,
        word & COUNT_MASK,
    )
}

impl HealthWindow {
    /// Records one outcome at `elapsed_us` for a window of length `window`.
    pub fn record(&self, window: Duration, elapsed_us: u64, success: bool) {
        let epoch = elapsed_us / bucket_width_us(window);
        let bucket = &self.buckets[(epoch % WINDOW_BUCKETS as u64) as usize];
        let tag = epoch & EPOCH_MASK;
        let mut rotated = false;
        let _ = bucket.fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
            let (e, mut s, mut f) = unpack(word);
            rotated = e != tag;
            if rotated {
                (s, f) = (0, 0);
            }
            if success {
                s = (s + 1).min(COUNT_MASK);
            } else {
                f = (f + 1).min(COUNT_MASK);
            }
            Some((tag << (2 * COUNT_BITS)) | (s << COUNT_BITS) | f)
        });
        // Only a rotation moves into a new epoch; a record into the current bucket finds it
        // published already, so the common path costs one CAS.
        if rotated {
            self.last_epoch.fetch_max(epoch, Ordering::AcqRel);
            self.clear_aged_out(tag);
        }
    }

    /// Clears every bucket that is a whole window or more older than `tag`.
    fn clear_aged_out(&self, tag: u64) {
        for bucket in &self.buckets {
            let word = bucket.load(Ordering::Acquire);
            let (e, s, f) = unpack(word);
            let age = tag.wrapping_sub(e) & EPOCH_MASK;
            if (s, f) != (0, 0) && age >= WINDOW_BUCKETS as u64 {
                // Fails harmlessly if someone counted into it meanwhile: then it is fresh.
                let _ = bucket.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }

    /// `(successes, failures)` recorded within the window ending at `elapsed_us`.
    pub fn counts(&self, window: Duration, elapsed_us: u64) -> (u64, u64) {
        let epoch = elapsed_us / bucket_width_us(window);
        if epoch.saturating_sub(self.last_epoch.load(Ordering::Acquire)) >= WINDOW_BUCKETS as u64 {
            return (0, 0); // nothing recorded within the window
        }
        let current = epoch & EPOCH_MASK;
        self.buckets.iter().fold((0, 0), |(s_all, f_all), bucket| {
            let (e, s, f) = unpack(bucket.load(Ordering::Acquire));
            let age = current.wrapping_sub(e) & EPOCH_MASK;
            if age < WINDOW_BUCKETS as u64 {
                (s_all + s, f_all + f)
            } else {
                (s_all, f_all)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Found by the property tests: with a 24-bit tag alone, a bucket written exactly 2^24 bucket
    /// widths ago counted as current again.
    #[test]
    fn i11_old_outcomes_never_come_back_after_the_tag_wraps() {
        let w = HealthWindow::default();
        w.record(MS, 0, false);
        let width = bucket_width_us(MS);
        assert_eq!(
            w.counts(MS, (1 << EPOCH_BITS) * width),
            (0, 0),
            "read after a long silence"
        );
        // Periodic traffic that keeps landing in one other bucket must not revive the old one.
        let w = HealthWindow::default();
        w.record(MS, 0, false);
        let mut t = width; // bucket 1
        while t < (1 << EPOCH_BITS) * width {
            w.record(MS, t, true);
            t += WINDOW_BUCKETS as u64 * width * 4096;
        }
        let now = (1 << EPOCH_BITS) * width;
        w.record(MS, now + width, true);
        let (_, failures) = w.counts(MS, now + width);
        assert_eq!(failures, 0, "a failure 2^24 buckets old came back");
    }

    #[test]
    fn window_counts_only_the_last_window() {
        let window = Duration::from_secs(8);
        let w = HealthWindow::default();
        for s in 0..16u64 {
            w.record(window, s * 1_000_000, s % 2 == 0);
        }
        // At t = 15 s the window holds seconds 8..=15: 4 successes, 4 failures.
        assert_eq!(w.counts(window, 15 * 1_000_000), (4, 4));
        assert_eq!(w.counts(window, 100 * 1_000_000), (0, 0));
    }
}
