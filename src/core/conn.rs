use std::time::Duration;

use crate::core::{HealthPolicy, HealthWindow, UnhealthyReason, Verdict};
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
    consecutive: u32,
    successes: u64,
    failures: u64,
    cancelled: u64,
    latency_sum_us: u64,
    latency_max_us: u64,
    window: HealthWindow,
    unhealthy: Option<UnhealthyReason>,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl CallRecord {
    /// A successful call of `latency`, finished `at` after the connection was made.
    pub fn success(&mut self, policy: &HealthPolicy, at: Duration, latency: Duration) {
        let us = micros(latency);
        self.successes += 1;
        self.latency_sum_us = self.latency_sum_us.saturating_add(us);
        self.latency_max_us = self.latency_max_us.max(us);
        self.consecutive = 0;
        self.window.record(policy.window, micros(at), true);
    }

    /// A failed call finished `at`; returns the verdict after it. An unhealthy verdict closes the
    /// latch with its reason; the latch never opens again.
    pub fn failure(&mut self, policy: &HealthPolicy, at: Duration) -> Verdict {
        self.failures += 1;
        self.consecutive = self.consecutive.saturating_add(1);
        let at = micros(at);
        self.window.record(policy.window, at, false);
        if let Some(reason) = self.unhealthy {
            return Verdict::Unhealthy(reason);
        }
        let verdict = policy.verdict(self.consecutive, self.window.counts(policy.window, at));
        if let Verdict::Unhealthy(reason) = verdict {
            self.unhealthy = Some(reason);
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
        let reason = *self.unhealthy.get_or_insert(UnhealthyReason::ProbeFailed);
        Verdict::Unhealthy(reason)
    }

    /// A call dropped before it finished: neither outcome.
    pub fn cancelled(&mut self) {
        self.cancelled += 1;
    }

    /// The reason the latch closed on, if it did.
    pub fn unhealthy(&self) -> Option<UnhealthyReason> {
        self.unhealthy
    }

    /// Successful calls.
    pub fn successes(&self) -> u64 {
        self.successes
    }

    /// Failed calls.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Calls dropped unfinished.
    pub fn cancelled_count(&self) -> u64 {
        self.cancelled
    }

    /// Length of the trailing run of failures (I10).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
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
        self.window.counts(policy.window, micros(at))
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
}
