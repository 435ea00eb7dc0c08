use std::time::Duration;

use crate::core::health::{FailureBuckets, SuccessBuckets, add_failure};
use crate::core::{HealthPolicy, UnhealthyReason, Verdict};
use crate::sync::atomic::{AtomicU64, Ordering};

/// Set in the claim word while an idle sweep holds a connection, and forever once it evicted it.
const RETIRED: u64 = 1 << 63;
const IN_FLIGHT_MASK: u64 = RETIRED - 1;

/// The claim word of one connection: calls in flight, and the `RETIRED` bit a sweep sets to take
/// it. One word, so a sweep's claim and a call's start are ordered against each other (I5): either
/// the call starts first and the claim fails, or the claim wins and the call starts on a connection
/// already on its way out (which the caller may still use; the pool just no longer hands it out).
///
/// ```
/// use keyed_pool::core::CallClaim;
/// let claim = CallClaim::default();
/// claim.call_started();
/// assert!(!claim.try_retire(|| true), "a call is in flight");
/// claim.call_ended();
/// assert!(!claim.try_retire(|| false), "not idle: the claim is given back");
/// assert!(claim.try_retire(|| true));
/// assert!(claim.is_retired());
/// ```
#[derive(Debug, Default)]
pub struct CallClaim {
    word: AtomicU64,
}

impl CallClaim {
    /// A call starts.
    pub fn call_started(&self) {
        self.word.fetch_add(1, Ordering::AcqRel);
    }

    /// A call ends. Returns `true` if it was the last call in flight: the connection just became
    /// closable to make room (issue 13: a checkout waiting at the cap is woken then).
    pub fn call_ended(&self) -> bool {
        self.word.fetch_sub(1, Ordering::AcqRel) & IN_FLIGHT_MASK == 1
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> u64 {
        self.word.load(Ordering::Acquire) & IN_FLIGHT_MASK
    }

    /// `true` once a sweep has taken the connection.
    pub fn is_retired(&self) -> bool {
        self.word.load(Ordering::Acquire) & RETIRED != 0
    }

    /// Claims the connection for eviction if no call is in flight and `still` holds once the claim
    /// is made (read the idle clock inside `still`: a call that ended before the claim has moved
    /// it). On success the connection stays retired; otherwise the claim is given back.
    pub fn try_retire(&self, still: impl FnOnce() -> bool) -> bool {
        if self
            .word
            .compare_exchange(0, RETIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        if still() {
            true
        } else {
            self.word.fetch_and(!RETIRED, Ordering::AcqRel);
            false
        }
    }
}

/// The outcome record of one connection: counts, latency, the consecutive-failure run (I10), the
/// sliding window (I11) and the unhealthy latch with the reason it closed on (I9). Plain data with
/// time passed in (the offset since the connection was made); the pool keeps it under the
/// connection's lock.
///
/// Compact (issue 16): what a connection that only succeeds needs is inline (the successes, the
/// latency sum and maximum, and the success half of the window: 72 bytes); everything else (the
/// failure and cancel counts, the failure run, the failure half of the window and the latch) is
/// one box, allocated by the first failure or cancel. So a pooled connection that never failed is
/// still one allocation; one that failed or was cancelled once has a second (80 bytes). What the
/// record reports is the same either way, and exact (I9–I11).
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::{CallRecord, HealthPolicy, UnhealthyReason, Verdict};
/// let policy = HealthPolicy { consecutive_failures: 2, ..HealthPolicy::default() };
/// let mut record = CallRecord::default();
/// let t = Duration::from_millis(5);
/// assert_eq!(record.failure(&policy, t), Verdict::Healthy);
/// assert!(record.failure(&policy, t).is_unhealthy());
/// record.success(&policy, t, Duration::from_millis(1));
/// // Latched with the reason it closed on, whatever comes after.
/// assert_eq!(record.unhealthy(), Some(UnhealthyReason::ConsecutiveFailures { count: 2 }));
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallRecord {
    successes: u64,
    latency_sum_us: u64,
    latency_max_us: u64,
    /// The window's successes and its newest bucket; its failures are in `rare`.
    window: SuccessBuckets,
    /// `None` until the first failure or cancel: all its counts are zero then, the run is empty,
    /// the window has no failures and the latch is open.
    rare: Option<Box<Rare>>,
}

/// The part of a [`CallRecord`] that only a connection that failed (or had a call cancelled)
/// needs, in one allocation.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rare {
    failures: u64,
    cancelled: u64,
    /// 4 bytes beside the 32 of the failure buckets (both 4-aligned): `Rare` is 80 bytes.
    consecutive: u32,
    /// Failures per bucket of the window, indexed as `CallRecord::window`'s successes.
    window: FailureBuckets,
    unhealthy: Option<UnhealthyReason>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl CallRecord {
    /// A successful call of `latency`, finished `at` after the connection was made.
    // Inlined into the pool's one caller, as it was before the split (issue 16's instruction gate:
    // called out of line, a full call took 29 instructions more).
    #[inline]
    pub fn success(&mut self, policy: &HealthPolicy, at: Duration, latency: Duration) {
        self.success_us(policy, micros(at), micros(latency));
    }

    /// [`success`](Self::success) with both times already in microseconds: the pool converts the
    /// latency once for the record and its latency distribution.
    #[inline]
    pub(crate) fn success_us(&mut self, policy: &HealthPolicy, at_us: u64, latency_us: u64) {
        self.successes += 1;
        self.latency_sum_us = self.latency_sum_us.saturating_add(latency_us);
        self.latency_max_us = self.latency_max_us.max(latency_us);
        let failures = match self.rare.as_deref_mut() {
            Some(rare) => {
                rare.consecutive = 0;
                Some(&mut rare.window)
            }
            None => None,
        };
        if let Some(index) = self.window.place(failures, policy.window, at_us) {
            self.window.add_success(index);
        }
    }

    /// The failure-side state, allocated on first use.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// A failed call finished `at`; returns the verdict after it. An unhealthy verdict closes the
    /// latch with its reason; the latch never opens again.
    pub fn failure(&mut self, policy: &HealthPolicy, at: Duration) -> Verdict {
        let at = micros(at);
        // Allocated before the slide, so the slide clears the failure buckets it passes (a fresh
        // box has none to clear).
        let rare = self.rare.get_or_insert_with(Box::default);
        rare.failures += 1;
        rare.consecutive = rare.consecutive.saturating_add(1);
        if let Some(index) = self.window.place(Some(&mut rare.window), policy.window, at) {
            add_failure(&mut rare.window, index);
        }
        if let Some(reason) = rare.unhealthy {
            return Verdict::Unhealthy(reason);
        }
        let counts = self.window.counts(Some(&rare.window), policy.window, at);
        let verdict = policy.verdict(rare.consecutive, counts);
        if let Verdict::Unhealthy(reason) = verdict {
            rare.unhealthy = Some(reason);
        }
        verdict
    }

    /// A failed liveness probe, finished `at`: counted as a failure (in the run and the window) and
    /// decisive, so the latch closes with [`UnhealthyReason::ProbeFailed`] unless it had already
    /// closed on another reason, which it keeps. Returns the verdict after it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyed_pool::core::{CallRecord, HealthPolicy, UnhealthyReason, Verdict};
    /// let mut record = CallRecord::default();
    /// let verdict = record.probe_failure(&HealthPolicy::default(), Duration::from_secs(1));
    /// assert_eq!(verdict, Verdict::Unhealthy(UnhealthyReason::ProbeFailed));
    /// assert_eq!(record.failures(), 1);
    /// ```
    pub fn probe_failure(&mut self, policy: &HealthPolicy, at: Duration) -> Verdict {
        self.failure(policy, at);
        let reason = *self
            .rare()
            .unhealthy
            .get_or_insert(UnhealthyReason::ProbeFailed);
        Verdict::Unhealthy(reason)
    }

    /// A call dropped before it finished: neither outcome.
    pub fn cancelled(&mut self) {
        self.rare().cancelled += 1;
    }

    /// The reason the latch closed on, if it did.
    pub fn unhealthy(&self) -> Option<UnhealthyReason> {
        self.rare.as_ref().and_then(|rare| rare.unhealthy)
    }

    /// Successful calls.
    pub fn successes(&self) -> u64 {
        self.successes
    }

    /// Failed calls.
    pub fn failures(&self) -> u64 {
        self.rare.as_ref().map_or(0, |rare| rare.failures)
    }

    /// Calls dropped unfinished.
    pub fn cancelled_count(&self) -> u64 {
        self.rare.as_ref().map_or(0, |rare| rare.cancelled)
    }

    /// Length of the trailing run of failures (I10).
    pub fn consecutive_failures(&self) -> u32 {
        self.rare.as_ref().map_or(0, |rare| rare.consecutive)
    }

    /// Sum of the latencies of successful calls, in µs.
    pub fn latency_sum_us(&self) -> u64 {
        self.latency_sum_us
    }

    /// Highest latency of a successful call, in µs.
    pub fn latency_max_us(&self) -> u64 {
        self.latency_max_us
    }

    /// `(successes, failures)` in the window ending `at`.
    pub fn window_counts(&self, policy: &HealthPolicy, at: Duration) -> (u64, u64) {
        let failures = self.rare.as_ref().map(|rare| &rare.window);
        self.window.counts(failures, policy.window, micros(at))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn i5_claim_counts_calls_and_retires_only_when_none_is_in_flight() {
        let claim = CallClaim::default();
        assert_eq!(claim.in_flight(), 0);
        assert!(!claim.is_retired());
        claim.call_started();
        claim.call_started();
        assert_eq!(claim.in_flight(), 2);
        assert!(
            !claim.try_retire(|| true),
            "I5 violated: retired with calls in flight"
        );
        assert!(!claim.is_retired());
        claim.call_ended();
        assert_eq!(claim.in_flight(), 1);
        claim.call_ended();
        assert_eq!(claim.in_flight(), 0);
        // A claim whose re-check fails is rolled back: not retired, calls count again.
        assert!(!claim.try_retire(|| false));
        assert!(!claim.is_retired(), "a failed re-check leaves it unretired");
        assert_eq!(claim.in_flight(), 0);
        assert!(claim.try_retire(|| true));
        assert!(claim.is_retired());
        assert_eq!(claim.in_flight(), 0, "the retired bit is not a call");
        assert!(!claim.try_retire(|| true), "retired once");
    }

    #[test]
    fn i10_i13_record_counts_every_outcome_and_the_trailing_run() {
        let policy = HealthPolicy {
            consecutive_failures: 100,
            ..HealthPolicy::default()
        };
        let mut r = CallRecord::default();
        r.success(&policy, 10 * MS, 3 * MS);
        r.success(&policy, 11 * MS, 5 * MS);
        r.success(&policy, 12 * MS, 2 * MS);
        assert_eq!(r.successes(), 3);
        assert_eq!(r.latency_sum_us(), 10_000);
        assert_eq!(r.latency_max_us(), 5_000);
        assert_eq!(r.failure(&policy, 13 * MS), Verdict::Healthy);
        assert_eq!(r.failure(&policy, 14 * MS), Verdict::Healthy);
        assert_eq!(r.failures(), 2);
        assert_eq!(r.consecutive_failures(), 2, "I10 violated");
        r.cancelled();
        r.cancelled();
        r.cancelled();
        assert_eq!(r.cancelled_count(), 3);
        assert_eq!(
            r.consecutive_failures(),
            2,
            "I10 violated: a cancel is no outcome"
        );
        assert_eq!(r.window_counts(&policy, 14 * MS), (3, 2));
        r.success(&policy, 15 * MS, MS);
        assert_eq!(
            r.consecutive_failures(),
            0,
            "I10 violated: a success ends the run"
        );
        assert_eq!(r.successes(), 4);
        assert_eq!(r.failures(), 2);
        assert_eq!(r.unhealthy(), None);
        // A latency too large for u64 microseconds saturates instead of wrapping.
        r.success(&policy, 16 * MS, Duration::MAX);
        assert_eq!(r.latency_max_us(), u64::MAX);
        assert_eq!(r.latency_sum_us(), u64::MAX);
    }

    #[test]
    fn i9_the_record_latches_the_first_reason_and_a_probe_failure_is_its_own() {
        let policy = HealthPolicy {
            consecutive_failures: 2,
            min_requests: 100,
            ..HealthPolicy::default()
        };
        let mut r = CallRecord::default();
        assert_eq!(r.failure(&policy, MS), Verdict::Healthy);
        let closed = Verdict::Unhealthy(UnhealthyReason::ConsecutiveFailures { count: 2 });
        assert_eq!(r.failure(&policy, 2 * MS), closed);
        assert_eq!(
            r.unhealthy(),
            Some(UnhealthyReason::ConsecutiveFailures { count: 2 })
        );
        // Later failures report the latched reason, not a new count.
        assert_eq!(
            r.failure(&policy, 3 * MS),
            closed,
            "I9: the reason is stored when it latches"
        );
        assert_eq!(r.probe_failure(&policy, 4 * MS), closed);
        assert_eq!(r.failures(), 4);
        // A probe failure on a healthy record latches ProbeFailed (and counts as a failure).
        let mut p = CallRecord::default();
        assert_eq!(
            p.probe_failure(&policy, MS),
            Verdict::Unhealthy(UnhealthyReason::ProbeFailed)
        );
        assert_eq!(p.unhealthy(), Some(UnhealthyReason::ProbeFailed));
        assert_eq!((p.failures(), p.consecutive_failures()), (1, 1));
        // A probe failure that also reaches the run keeps the run's reason.
        let mut q = CallRecord::default();
        q.failure(&policy, MS);
        assert_eq!(q.probe_failure(&policy, 2 * MS), closed);
    }

    /// Issue 16's compact record: its size is asserted so that a field added inline (or a
    /// failure-side field moved back inline) fails here, not in a memory benchmark.
    #[test]
    fn the_record_is_compact_and_its_failure_side_is_allocated_by_the_first_failure_or_cancel() {
        use std::mem::size_of;
        assert!(
            size_of::<CallRecord>() <= 72,
            "CallRecord is {} B, more than the 72 of issue 16",
            size_of::<CallRecord>()
        );
        assert!(size_of::<Rare>() <= 80, "Rare is {} B", size_of::<Rare>());
        assert!(size_of::<crate::core::HealthWindow>() <= 48);
        let policy = HealthPolicy::default();
        let mut r = CallRecord::default();
        for i in 0..1_000 {
            r.success(&policy, i * MS, MS);
        }
        assert!(r.rare.is_none(), "successes alone allocate nothing");
        assert_eq!(
            (r.failures(), r.cancelled_count(), r.consecutive_failures()),
            (0, 0, 0)
        );
        assert_eq!(r.unhealthy(), None);
        let mut c = r.clone();
        c.cancelled();
        assert!(c.rare.is_some(), "a cancel is counted in the failure side");
        assert_eq!(
            c.window_counts(&policy, 999 * MS),
            r.window_counts(&policy, 999 * MS)
        );
        assert_ne!(c, r, "the cancel is part of the record's value");
        r.failure(&policy, 1_000 * MS);
        assert!(r.rare.is_some());
    }

    /// I9–I11 with the failure side allocated late: a record that succeeded for a long time (its
    /// window sliding over many buckets with no failure side to clear) and then mixes failures in,
    /// early and late records among them, reports exactly what a record of every outcome gives:
    /// the counts, the run, and the window at and after every record.
    #[test]
    fn i9_i10_i11_a_failure_side_allocated_late_counts_exactly() {
        let policy = HealthPolicy {
            consecutive_failures: 0,
            min_requests: u32::MAX,
            window: 8 * MS, // buckets of 1 ms
            ..HealthPolicy::default()
        };
        let width = 1_000u64; // µs
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for history in 0..200u64 {
            let mut r = CallRecord::default();
            let mut outcomes: Vec<(u64, bool)> = Vec::new();
            let mut t = 0u64;
            let first_failure = 20 + next() % 200;
            for i in 0..first_failure + 60 {
                let v = next();
                t += match v % 4 {
                    0 => 0,
                    1 => v % width,
                    2 => (v >> 8) % (12 * width),
                    _ => width,
                };
                let late = if v % 5 == 0 {
                    (v >> 16) % (12 * width)
                } else {
                    0
                };
                let at = t.saturating_sub(late);
                let ok = i < first_failure || (v >> 32) % 2 == 0;
                let d = Duration::from_micros(at);
                if ok {
                    r.success(&policy, d, MS);
                } else {
                    r.failure(&policy, d);
                }
                outcomes.push((at, ok));
                let run = outcomes.iter().rev().take_while(|(_, ok)| !ok).count() as u32;
                assert_eq!(
                    r.consecutive_failures(),
                    run,
                    "I10 violated: history {history}"
                );
                let failed = outcomes.iter().filter(|(_, ok)| !ok).count() as u64;
                assert_eq!(
                    (r.successes(), r.failures()),
                    (outcomes.len() as u64 - failed, failed)
                );
                let newest = outcomes.iter().map(|(at, _)| at / width).max().unwrap_or(0);
                for read in [t, t + width, t + 7 * width, t + 8 * width] {
                    let epoch = read / width;
                    let oldest = epoch.saturating_sub(7).max(newest.saturating_sub(7));
                    let want = outcomes
                        .iter()
                        .filter(|(at, _)| (oldest..=epoch).contains(&(at / width)))
                        .fold(
                            (0, 0),
                            |(s, f), &(_, ok)| if ok { (s + 1, f) } else { (s, f + 1) },
                        );
                    assert_eq!(
                        r.window_counts(&policy, Duration::from_micros(read)),
                        want,
                        "I11 violated: history {history}, read at {read} µs after {outcomes:?}"
                    );
                }
            }
        }
    }
}
