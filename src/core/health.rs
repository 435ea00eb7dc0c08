use std::fmt;
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
    /// A liveness probe (the connector's `probe`) failed or timed out while the transport still
    /// looked open: the server does not answer. Decisive on its own, unlike a call's failure,
    /// which may be the application's (see `docs/DESIGN.md`, "Liveness between uses").
    ProbeFailed,
}

impl fmt::Display for UnhealthyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures { count } => write!(f, "{count} consecutive failures"),
            Self::FailureRatio { failures, total } => {
                write!(f, "{failures} of {total} calls failed in the window")
            }
            Self::Closed => f.write_str("transport closed"),
            Self::ProbeFailed => f.write_str("liveness probe failed"),
        }
    }
}

impl std::error::Error for UnhealthyReason {}

/// Number of buckets of a [`HealthWindow`]: the window slides in steps of `window / 8`.
pub const WINDOW_BUCKETS: usize = 8;

/// A sliding window of call outcomes for the ratio detector: eight buckets of `window / 8` each.
///
/// Exact: [`counts`](Self::counts) at `t`, for any `t` at or after the newest record, equals the
/// outcomes recorded at times whose bucket lies within the eight buckets ending at `t`'s, for any
/// gaps between records (epochs are full 64-bit bucket numbers, so nothing old can alias as new)
/// and for records that arrive out of order (a record older than the newest by a whole window or
/// more is dropped, and never clears the bucket of a newer one). A read before the newest record
/// (a clock read racing a record) sees only what lies within a window of the newest. Plain data: the pool keeps it under the connection's lock. Time enters as
/// microseconds since the connection's creation; the window never reads a clock.
///
/// Compact (issue 16): the successes per bucket and the newest bucket number are inline (40
/// bytes); the failures per bucket are allocated by the first failure recorded, so a window that
/// has only seen successes holds no failure buckets at all. The counts are the same either way:
/// absent failure buckets count as zeros, and sliding clears both sides.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::HealthWindow;
/// let window = Duration::from_secs(8); // buckets of 1 s
/// let mut w = HealthWindow::default();
/// w.record(window, 0, false);
/// w.record(window, 7_500_000, true);
/// assert_eq!(w.counts(window, 7_900_000), (1, 1));
/// assert_eq!(w.counts(window, 8_000_000), (1, 0), "the failure at 0 s has slid out");
/// w.record(window, 500_000, false); // late: older than the window of the newest record
/// assert_eq!(w.counts(window, 8_000_000), (1, 0));
/// ```
#[derive(Clone, Debug, Default)]
pub struct HealthWindow {
    successes: SuccessBuckets,
    /// Failures per bucket, indexed as the successes; `None` until the first failure recorded,
    /// which reads as all zeros.
    failures: Option<Box<FailureBuckets>>,
}

/// Two windows are equal when they hold the same buckets, an absent failure side being equal to
/// one of zeros (whether a failure was ever recorded and has slid out is not part of the value).
impl PartialEq for HealthWindow {
    fn eq(&self, other: &Self) -> bool {
        const NONE: FailureBuckets = [0; WINDOW_BUCKETS];
        self.successes == other.successes
            && self.failures.as_deref().unwrap_or(&NONE)
                == other.failures.as_deref().unwrap_or(&NONE)
    }
}

impl Eq for HealthWindow {}

/// Failures per bucket: the half of a window allocated only once a connection fails.
pub(crate) type FailureBuckets = [u32; WINDOW_BUCKETS];

/// The inline half of a window: successes per bucket, and the bucket number both halves are valid
/// relative to. [`HealthWindow`] pairs it with its failure buckets; [`CallRecord`](crate::core::CallRecord)
/// keeps its failure buckets in the box of its other failure-side state, so that a failing
/// connection pays one allocation for both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SuccessBuckets {
    /// The successes of the bucket whose epoch is `e`, at index `e % WINDOW_BUCKETS`, for every
    /// `e` in `newest - 7 ..= newest` (the failures of that bucket are at the same index of the
    /// failure buckets).
    buckets: [u32; WINDOW_BUCKETS],
    /// The bucket number (elapsed / bucket width) of the newest record; buckets are valid relative
    /// to it.
    newest: u64,
}

fn bucket_width_us(window: Duration) -> u64 {
    let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    (us / WINDOW_BUCKETS as u64).max(1)
}

const SPAN: u64 = WINDOW_BUCKETS as u64;

impl SuccessBuckets {
    /// Makes room for a record at `elapsed_us`: slides both halves to its bucket if it is newer
    /// than the newest (every bucket passed starts empty, on both sides), and returns the index of
    /// its bucket, or `None` if it is a whole window older than the newest (dropped: no later read
    /// can see it, and its index holds a newer bucket).
    #[inline]
    pub(crate) fn place(
        &mut self,
        failures: Option<&mut FailureBuckets>,
        window: Duration,
        elapsed_us: u64,
    ) -> Option<usize> {
        let epoch = elapsed_us / bucket_width_us(window);
        if epoch > self.newest {
            // Slide: every bucket between the old newest and this one (all of them after a gap of
            // a whole window) starts empty.
            let stale = (epoch - self.newest).min(SPAN);
            match failures {
                Some(failures) => {
                    for e in epoch - stale + 1..=epoch {
                        let i = (e % SPAN) as usize;
                        self.buckets[i] = 0;
                        failures[i] = 0;
                    }
                }
                None => {
                    for e in epoch - stale + 1..=epoch {
                        self.buckets[(e % SPAN) as usize] = 0;
                    }
                }
            }
            self.newest = epoch;
        } else if self.newest - epoch >= SPAN {
            return None;
        }
        Some((epoch % SPAN) as usize)
    }

    /// Counts a success in the bucket `place` returned.
    #[inline]
    pub(crate) fn add_success(&mut self, index: usize) {
        self.buckets[index] = self.buckets[index].saturating_add(1);
    }

    /// `(successes, failures)` within the window ending at `elapsed_us`; absent failure buckets
    /// count as zeros.
    pub(crate) fn counts(
        &self,
        failures: Option<&FailureBuckets>,
        window: Duration,
        elapsed_us: u64,
    ) -> (u64, u64) {
        let epoch = elapsed_us / bucket_width_us(window);
        // Buckets hold epochs newest-7..=newest; the window at `epoch` covers epoch-7..=epoch.
        let lo = epoch
            .saturating_sub(SPAN - 1)
            .max(self.newest.saturating_sub(SPAN - 1));
        let hi = epoch.min(self.newest);
        if lo > hi {
            return (0, 0);
        }
        (lo..=hi).fold((0, 0), |(s_all, f_all), e| {
            let i = (e % SPAN) as usize;
            let f = failures.map_or(0, |failures| failures[i]);
            (s_all + u64::from(self.buckets[i]), f_all + u64::from(f))
        })
    }
}

/// Counts a failure in the bucket `SuccessBuckets::place` returned.
pub(crate) fn add_failure(failures: &mut FailureBuckets, index: usize) {
    failures[index] = failures[index].saturating_add(1);
}

impl HealthWindow {
    /// Records one outcome at `elapsed_us` for a window of length `window`.
    pub fn record(&mut self, window: Duration, elapsed_us: u64, success: bool) {
        let Some(index) = self
            .successes
            .place(self.failures.as_deref_mut(), window, elapsed_us)
        else {
            return; // older than any window a later read can see
        };
        if success {
            self.successes.add_success(index);
        } else {
            // Allocated after the slide: a fresh failure side is all zeros, which is what the
            // buckets it would have cleared held (no failure was ever recorded).
            add_failure(self.failures.get_or_insert_with(Box::default), index);
        }
    }

    /// `(successes, failures)` recorded within the window ending at `elapsed_us`.
    pub fn counts(&self, window: Duration, elapsed_us: u64) -> (u64, u64) {
        self.successes
            .counts(self.failures.as_deref(), window, elapsed_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The reference: every record kept, counted by its bucket number.
    fn reference(records: &[(u64, bool)], window: Duration, at: u64) -> (u64, u64) {
        let width = bucket_width_us(window);
        let epoch = at / width;
        let newest = records.iter().map(|(t, _)| t / width).max().unwrap_or(0);
        records
            .iter()
            .filter(|(t, _)| {
                let e = t / width;
                // Outcomes more than a window older than the newest record were dropped on
                // arrival; the window at `at` covers the eight buckets ending at it.
                e + SPAN > newest && e <= epoch && e + SPAN > epoch
            })
            .fold(
                (0, 0),
                |(s, f), (_, ok)| if *ok { (s + 1, f) } else { (s, f + 1) },
            )
    }

    /// Found from outside the pool (issue 11, defect 8): with a 24-bit epoch tag, failures came
    /// back after a silence of 2^24 + k bucket widths. Every gap up to 2^40 widths, every k.
    #[test]
    fn i11_old_outcomes_never_come_back_after_any_silence() {
        let width = bucket_width_us(MS);
        for shift in [8u32, 16, 23, 24, 25, 32, 40] {
            for k in 0..=9u64 {
                let mut w = HealthWindow::default();
                let mut records = Vec::new();
                for i in 0..5 {
                    w.record(MS, i * width, false);
                    records.push((i * width, false));
                }
                let later = ((1u64 << shift) + k) * width;
                w.record(MS, later, true);
                records.push((later, true));
                for at in [later, later + width, later + 7 * width, later + 8 * width] {
                    assert_eq!(
                        w.counts(MS, at),
                        reference(&records, MS, at),
                        "I11 violated: after 2^{shift}+{k} buckets, read at {at}"
                    );
                }
            }
        }
    }

    /// Issue 11, defect 9: a success from one window ago erased 10 current failures.
    #[test]
    fn i9_a_late_record_never_erases_newer_outcomes() {
        let window = Duration::from_secs(8);
        let mut w = HealthWindow::default();
        let now = 20_000_000;
        for _ in 0..10 {
            w.record(window, now, false);
        }
        w.record(window, now - 8_000_000, true); // exactly one window old: same bucket index
        assert_eq!(
            w.counts(window, now),
            (0, 10),
            "I9 violated: the late record erased failures"
        );
        w.record(window, now - 3_000_000, true); // late but inside the window: counted
        assert_eq!(w.counts(window, now), (1, 10));
    }

    /// Exactness against the reference on pseudo-random histories: out-of-order arrivals, gaps
    /// from zero to 2^40 bucket widths, reads at and after every record.
    #[test]
    fn i9_i11_window_equals_the_reference_on_random_histories() {
        let window = Duration::from_millis(8);
        let width = bucket_width_us(window);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for history in 0..300 {
            let mut w = HealthWindow::default();
            let mut records = Vec::new();
            let mut t = 0u64;
            for _ in 0..60 {
                let r = next();
                t = t.saturating_add(match r % 6 {
                    0 => 0,
                    1 => r % width,
                    2 => (r >> 8) % (4 * width),
                    3 => (r >> 8) % (16 * width),
                    4 => width << ((r >> 8) % 41),
                    _ => width,
                });
                // A third of the records arrive late, by up to two windows.
                let at = if r % 3 == 0 {
                    t.saturating_sub((r >> 16) % (16 * width))
                } else {
                    t
                };
                let ok = (r >> 32) % 3 != 0;
                w.record(window, at, ok);
                records.push((at, ok));
                let newest = records.iter().map(|(t, _)| *t).max().unwrap_or(0);
                for read in [newest, newest + width, newest + 9 * width] {
                    assert_eq!(
                        w.counts(window, read),
                        reference(&records, window, read),
                        "history {history}: window differs from the reference at {read} after {records:?}"
                    );
                }
            }
        }
    }

    /// Issue 16's compact window: 48 bytes inline, the failure buckets allocated by the first
    /// failure only; a window whose failures have slid out equals one that never had any, and
    /// both count the same.
    #[test]
    fn i11_the_failure_side_is_allocated_by_the_first_failure_and_reads_as_zeros_before() {
        assert!(
            std::mem::size_of::<HealthWindow>() <= 48,
            "HealthWindow is {} B",
            std::mem::size_of::<HealthWindow>()
        );
        let window = Duration::from_secs(8);
        let s = 1_000_000u64;
        let mut only = HealthWindow::default();
        let mut failed = HealthWindow::default();
        for t in 0..100 {
            only.record(window, t * s / 3, true);
            failed.record(window, t * s / 3, true);
        }
        assert!(only.failures.is_none(), "successes alone allocate nothing");
        failed.record(window, 33 * s, false);
        assert!(failed.failures.is_some());
        assert_eq!(
            failed.counts(window, 33 * s),
            (22, 1),
            "records at 26 s ..= 33 s"
        );
        assert_ne!(only, failed);
        // Eight buckets later both hold one success and no failure: equal values.
        only.record(window, 41 * s, true);
        failed.record(window, 41 * s, true);
        assert_eq!(
            failed.counts(window, 41 * s),
            (1, 0),
            "the failure slid out"
        );
        assert_eq!(only, failed, "an absent failure side equals one of zeros");
    }

    #[test]
    fn window_counts_only_the_last_window() {
        let window = Duration::from_secs(8);
        let mut w = HealthWindow::default();
        for s in 0..16u64 {
            w.record(window, s * 1_000_000, s % 2 == 0);
        }
        // At t = 15 s the window holds seconds 8..=15: 4 successes, 4 failures.
        assert_eq!(w.counts(window, 15 * 1_000_000), (4, 4));
        assert_eq!(w.counts(window, 100 * 1_000_000), (0, 0));
    }

    /// The edges of `validate` (issue 17: `<` → `<=` survived): each bound's own value is
    /// accepted, the value just past it refused with the error that names it.
    #[test]
    fn i9_i11_validation_accepts_each_bound_and_refuses_just_past_it() {
        let p = HealthPolicy::default();
        for ok in [
            HealthPolicy {
                failure_ratio: 1.0,
                window: MS,
                min_requests: 1,
                ..p
            },
            HealthPolicy {
                failure_ratio: f64::MIN_POSITIVE,
                ..p
            },
        ] {
            assert_eq!(ok.validate(), Ok(()), "{ok:?} must be accepted");
        }
        for ratio in [0.0, 1.0 + f64::EPSILON, -0.5, f64::NAN] {
            let bad = HealthPolicy {
                failure_ratio: ratio,
                ..p
            };
            assert!(
                matches!(
                    bad.validate(),
                    Err(ConfigError::FailureRatioOutOfRange { .. })
                ),
                "ratio {ratio} must be refused"
            );
        }
        let short = MS - Duration::from_nanos(1);
        assert_eq!(
            HealthPolicy { window: short, ..p }.validate(),
            Err(ConfigError::WindowTooShort { window: short })
        );
        assert_eq!(
            HealthPolicy {
                min_requests: 0,
                ..p
            }
            .validate(),
            Err(ConfigError::ZeroMinRequests)
        );
    }

    /// The verdict's edges: the run fires at exactly the threshold (not one before), a threshold of
    /// 0 disables the run, the ratio fires at exactly the ratio with exactly the minimum volume and
    /// not one call below it, and an empty window never fires (even for a policy that `validate`
    /// would refuse).
    #[test]
    fn i9_i10_i11_verdict_fires_exactly_at_its_thresholds() {
        let p = HealthPolicy {
            consecutive_failures: 3,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 4,
        };
        assert_eq!(p.verdict(2, (0, 0)), Verdict::Healthy);
        assert_eq!(
            p.verdict(3, (0, 0)),
            Verdict::Unhealthy(UnhealthyReason::ConsecutiveFailures { count: 3 })
        );
        let no_run = HealthPolicy {
            consecutive_failures: 0,
            ..p
        };
        assert_eq!(
            no_run.verdict(0, (10, 0)),
            Verdict::Healthy,
            "0 disables the run"
        );
        assert_eq!(
            no_run.verdict(1000, (10, 0)),
            Verdict::Healthy,
            "0 disables the run"
        );
        // Ratio: 2 of 4 at 0.5 fires; 1 of 4 does not; 2 of 3 is below the volume.
        assert_eq!(
            p.verdict(0, (2, 2)),
            Verdict::Unhealthy(UnhealthyReason::FailureRatio {
                failures: 2,
                total: 4
            })
        );
        assert_eq!(p.verdict(0, (3, 1)), Verdict::Healthy);
        assert_eq!(
            p.verdict(0, (1, 2)),
            Verdict::Healthy,
            "I11: below the minimum volume"
        );
        let no_volume = HealthPolicy {
            min_requests: 0,
            ..no_run
        };
        assert_eq!(
            no_volume.verdict(0, (0, 0)),
            Verdict::Healthy,
            "an empty window never fires"
        );
        assert!(p.verdict(3, (0, 0)).is_unhealthy());
        assert!(!p.verdict(0, (0, 0)).is_unhealthy());
    }

    #[test]
    fn i9_unhealthy_reasons_display_what_closed_the_connection() {
        let shown = [
            (
                UnhealthyReason::ConsecutiveFailures { count: 5 },
                "5 consecutive failures",
            ),
            (
                UnhealthyReason::FailureRatio {
                    failures: 7,
                    total: 20,
                },
                "7 of 20 calls failed in the window",
            ),
            (UnhealthyReason::Closed, "transport closed"),
            (UnhealthyReason::ProbeFailed, "liveness probe failed"),
        ];
        for (reason, text) in shown {
            assert_eq!(reason.to_string(), text);
        }
    }

    /// The window's bucket arithmetic at exact instants: a bucket is `window / 8` wide, the read
    /// at epoch `e` sees epochs `e-7..=e`, a record 8 buckets old is dropped, 7 old is kept, and a
    /// read older than the newest record sees only what was recorded up to it.
    #[test]
    fn i11_window_bucket_edges() {
        let window = Duration::from_secs(8); // 1 s buckets
        let s = 1_000_000u64;
        assert_eq!(bucket_width_us(window), s);
        assert_eq!(bucket_width_us(Duration::from_micros(3)), 1, "never zero");
        let mut w = HealthWindow::default();
        w.record(window, 10 * s, false);
        w.record(window, 10 * s + s - 1, true); // same bucket
        assert_eq!(w.counts(window, 10 * s), (1, 1));
        assert_eq!(
            w.counts(window, 17 * s + s - 1),
            (1, 1),
            "7 buckets later it still counts"
        );
        assert_eq!(
            w.counts(window, 18 * s),
            (0, 0),
            "8 buckets later it is gone"
        );
        assert_eq!(
            w.counts(window, 9 * s),
            (0, 0),
            "a read before the record sees nothing of it"
        );
        // A record 8 buckets behind the newest is dropped; 7 behind is kept.
        w.record(window, 2 * s, false);
        assert_eq!(
            w.counts(window, 10 * s),
            (1, 1),
            "8 behind the newest is dropped"
        );
        assert_eq!(
            w.counts(window, 2 * s),
            (0, 0),
            "8 behind the newest is dropped"
        );
        w.record(window, 3 * s, false);
        assert_eq!(
            w.counts(window, 10 * s),
            (1, 2),
            "7 behind the newest is kept"
        );
        assert_eq!(
            w.counts(window, 3 * s),
            (0, 1),
            "a read at the old bucket sees it alone"
        );
        // Moving on by 2 buckets clears exactly the buckets it passes (epochs 11 and 12, which
        // share their slots with epochs 3 and 4).
        w.record(window, 12 * s, true);
        assert_eq!(w.counts(window, 12 * s), (2, 1), "epochs 10 and 12 remain");
        assert_eq!(
            w.counts(window, 11 * s),
            (1, 1),
            "a read at 11 sees epoch 10 only"
        );
        assert_eq!(
            w.counts(window, 10 * s),
            (1, 1),
            "epoch 3's slot was reused and cleared"
        );
    }
}
