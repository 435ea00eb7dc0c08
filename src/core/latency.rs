//! [`LatencyHistogram`]: a latency distribution in fixed memory, recorded with two relaxed atomic
//! adds, read as a [`LatencySnapshot`] that estimates quantiles within a documented relative error.
//!
//! Buckets are log-spaced in microseconds: two per power of two (the leading bit and the one after
//! it), so each bucket's upper bound is at most 1.5 times its lower bound. A quantile is answered
//! with the geometric middle of the bucket that holds the sample of that rank, which is within
//! [`MAX_RELATIVE_ERROR`] (√1.5 − 1 ≈ 22.5 %) of that sample for every latency from 1 µs up to
//! [`MAX_TRACKED`] (about 134 s). Below 1 µs the estimate is 0; above [`MAX_TRACKED`] it is
//! [`MAX_TRACKED`] (a lower bound). Fixed size (56 counters plus a sum, 456 bytes), whatever the
//! number of calls: memory is bounded per connection, and recording never allocates or locks.
//!
//! A pooled connection keeps its distribution as a [`LatencySnapshot`] (the same buckets, plain
//! counters) under its record's lock, which every success takes anyway (issue 16: a pointer of 8
//! bytes inside the lock where a lazily set `LatencyHistogram` beside it took 16); the lock-free
//! [`LatencyHistogram`] is for recording from several threads without one.

use std::time::Duration;

use crate::sync::atomic::{AtomicU64, Ordering};

/// Octaves (powers of two of microseconds) tracked with their own buckets: 1 µs to 2^27 µs.
const OCTAVES: usize = 27;

/// The number of buckets: one for latencies under 1 µs, two per octave, one for everything at or
/// above [`MAX_TRACKED`].
pub const LATENCY_BUCKETS: usize = 1 + 2 * OCTAVES + 1;

/// The largest latency with a bucket of its own: 2^27 µs (about 134 s). Longer ones share the last
/// bucket, whose estimate is this bound.
pub const MAX_TRACKED: Duration = Duration::from_micros(1 << OCTAVES);

/// The worst relative error of [`LatencySnapshot::quantile`] for a latency between 1 µs and
/// [`MAX_TRACKED`]: √1.5 − 1. The estimate `e` of a sample `v` satisfies `|e − v| ≤ 0.2248 · v`.
pub const MAX_RELATIVE_ERROR: f64 = 0.224_745;

/// The bucket of a latency of `us` microseconds.
fn bucket_of(us: u64) -> usize {
    if us == 0 {
        return 0;
    }
    if us >= 1 << OCTAVES {
        return LATENCY_BUCKETS - 1;
    }
    let octave = (63 - us.leading_zeros()) as usize; // floor(log2(us)), < OCTAVES
    let upper_half = if octave == 0 {
        0
    } else {
        ((us >> (octave - 1)) & 1) as usize
    };
    1 + 2 * octave + upper_half
}

/// `[lower, upper)` of bucket `i`, in microseconds (`upper` is `u64::MAX` for the last one).
fn bucket_bounds_us(i: usize) -> (u64, u64) {
    match i {
        0 => (0, 1),
        i if i >= LATENCY_BUCKETS - 1 => (1 << OCTAVES, u64::MAX),
        i => {
            let octave = (i - 1) / 2;
            let upper_half = (i - 1) % 2 == 1;
            let base = 1u64 << octave;
            // In octave 0 (1 µs) the halves are [1, 1.5) and [1.5, 2): integers land in the first.
            let half = (base as f64 / 2.0).max(0.5);
            let lower = base as f64 + if upper_half { half } else { 0.0 };
            let upper = lower + half;
            (lower.ceil() as u64, upper.ceil() as u64)
        }
    }
}

/// A latency distribution in fixed memory, shared by the threads that record into it.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::LatencyHistogram;
/// let h = LatencyHistogram::default();
/// for ms in 1..=100 {
///     h.record(Duration::from_millis(ms));
/// }
/// let snap = h.snapshot();
/// assert_eq!(snap.count(), 100);
/// let p99 = snap.quantile(0.99).unwrap();
/// // Within the documented error of the true 99th sample (99 ms).
/// let err = (p99.as_secs_f64() - 0.099).abs() / 0.099;
/// assert!(err <= keyed_pool::core::MAX_RELATIVE_ERROR, "{p99:?}");
/// ```
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one latency: two relaxed atomic adds. Saturates at `u64::MAX` microseconds.
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        // Relaxed: each counter is exact on its own; a snapshot racing a record may see the bucket
        // and the sum of that record one without the other, never a count that goes back.
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// A copy of the counts, bucket by bucket. Each bucket only grows, so a snapshot taken after
    /// another never has a smaller count in any bucket.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a [`LatencyHistogram`]'s counts: plain data, mergeable, with quantile estimates.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::LatencySnapshot;
/// let mut a = LatencySnapshot::default();
/// a.record(Duration::from_millis(2));
/// let mut b = LatencySnapshot::default();
/// b.record(Duration::from_millis(8));
/// a.merge(&b);
/// assert_eq!(a.count(), 2);
/// assert_eq!(a.sum(), Duration::from_millis(10));
/// assert_eq!(LatencySnapshot::default().quantile(0.5), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: [u64; LATENCY_BUCKETS],
    sum_us: u64,
}

impl Default for LatencySnapshot {
    fn default() -> Self {
        Self {
            buckets: [0; LATENCY_BUCKETS],
            sum_us: 0,
        }
    }
}

impl LatencySnapshot {
    /// Adds one latency (for building a snapshot by hand, as a test or a model does).
    pub fn record(&mut self, latency: Duration) {
        self.record_us(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// [`record`](Self::record) of a latency already in microseconds: a pooled connection keeps
    /// its distribution as a snapshot under its record's lock (issue 16), and converts each
    /// latency once for both.
    #[inline]
    pub(crate) fn record_us(&mut self, us: u64) {
        self.buckets[bucket_of(us)] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Adds `other`'s counts to these (the distribution of both together).
    pub fn merge(&mut self, other: &LatencySnapshot) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine = mine.saturating_add(theirs);
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |n, &b| n.saturating_add(b))
    }

    /// The sum of the latencies recorded, at microsecond resolution.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us)
    }

    /// The mean latency; `None` before the first.
    pub fn mean(&self) -> Option<Duration> {
        match self.count() {
            0 => None,
            n => Some(Duration::from_micros(self.sum_us / n)),
        }
    }

    /// An estimate of the `q`-quantile (`q` in `[0, 1]`, clamped; NaN counts as 0): the sample of
    /// rank `⌈q · count⌉` (at least 1) lies in one bucket, and the estimate is that bucket's
    /// geometric middle, within [`MAX_RELATIVE_ERROR`] of the sample (see the module docs for the
    /// edges). `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen >= rank {
                return Some(Self::estimate(i));
            }
        }
        Some(Self::estimate(LATENCY_BUCKETS - 1))
    }

    /// The value reported for a sample in bucket `i`.
    fn estimate(i: usize) -> Duration {
        match bucket_bounds_us(i) {
            (0, _) => Duration::ZERO,
            (lower, u64::MAX) => Duration::from_micros(lower),
            (lower, upper) => {
                // Integer latencies in octave 0 are all exactly 1 µs.
                if upper <= lower + 1 {
                    return Duration::from_micros(lower);
                }
                Duration::from_secs_f64((lower as f64 * upper as f64).sqrt() / 1e6)
            }
        }
    }

    /// `(upper bound, count)` of every bucket in order, the last one's bound being
    /// `Duration::MAX`: the shape of a Prometheus histogram's `le` buckets (after a running sum).
    pub fn buckets(&self) -> impl Iterator<Item = (Duration, u64)> + '_ {
        self.buckets.iter().enumerate().map(|(i, &n)| {
            let (_, upper) = bucket_bounds_us(i);
            let upper = if upper == u64::MAX {
                Duration::MAX
            } else {
                Duration::from_micros(upper)
            };
            (upper, n)
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_microsecond_value_falls_inside_its_bucket() {
        for us in (0..5_000u64).chain([1 << 20, (1 << 27) - 1, 1 << 27, u64::MAX]) {
            let i = bucket_of(us);
            let (lower, upper) = bucket_bounds_us(i);
            assert!(
                lower <= us && (us < upper || upper == u64::MAX),
                "{us} µs in bucket {i} = [{lower}, {upper})"
            );
        }
        // Buckets tile the line with no gap: each starts where the previous ended.
        for i in 1..LATENCY_BUCKETS {
            assert_eq!(
                bucket_bounds_us(i - 1).1,
                bucket_bounds_us(i).0,
                "bucket {i}"
            );
        }
    }

    #[test]
    fn the_edges_of_the_tracked_range() {
        let mut s = LatencySnapshot::default();
        s.record(Duration::from_nanos(300));
        assert_eq!(s.quantile(1.0), Some(Duration::ZERO), "under 1 µs reads 0");
        let mut s = LatencySnapshot::default();
        s.record(Duration::from_secs(3600));
        assert_eq!(
            s.quantile(0.5),
            Some(MAX_TRACKED),
            "beyond the range reads its bound"
        );
        let mut s = LatencySnapshot::default();
        s.record(Duration::from_micros(1));
        assert_eq!(s.quantile(f64::NAN), Some(Duration::from_micros(1)));
    }

    proptest! {
        /// The documented bound: every quantile estimate is within `MAX_RELATIVE_ERROR` of the
        /// sample of that rank, for latencies from 1 µs to `MAX_TRACKED`.
        #[test]
        fn quantiles_are_within_the_documented_relative_error(
            mut samples in proptest::collection::vec(1u64..(1 << 27), 1..300),
            q in 0.0f64..=1.0,
        ) {
            let h = LatencyHistogram::default();
            for &us in &samples {
                h.record(Duration::from_micros(us));
            }
            let snap = h.snapshot();
            prop_assert_eq!(snap.count(), samples.len() as u64);
            prop_assert_eq!(snap.sum(), Duration::from_micros(samples.iter().sum()));
            samples.sort_unstable();
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            let exact = samples[rank - 1] as f64;
            let estimate = snap.quantile(q).unwrap().as_secs_f64() * 1e6;
            let err = (estimate - exact).abs() / exact;
            prop_assert!(
                err <= MAX_RELATIVE_ERROR,
                "q = {q}: estimate {estimate} µs, sample {exact} µs, error {err}"
            );
        }
    }
}
