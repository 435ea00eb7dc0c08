use std::time::Duration;

use crate::ConfigError;
use crate::core::BackoffPolicy;

/// How an address's ejection count rises and falls (I12, I18). Anchors: Envoy's outlier detection
/// and gRPC A50 (a multiplier that grows on every ejection and drops by one per quiet interval),
/// Finagle's failure accrual (the first request after the dead period is a single probe).
///
/// - The count rises by one on every failed connect, every unhealthy eviction, and every
///   connection found closed within [`short_lived`](Self::short_lived) of being made, unless it
///   served and its last call succeeded, so a server that accepts and closes at once, accepts and
///   fails every request, or dies mid-request, backs off like one that refuses; a connection the
///   server closes between requests after answering on it (a keep-alive's end) is no failure.
/// - A successful connect does **not** reset it: TCP accepting says little about the server.
/// - It falls by one for every [`decay_interval`](Self::decay_interval) during which the address is
///   not backing off and nothing fails; once it is back to zero the address holds no state (I18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectionPolicy {
    /// A connection found closed younger than this counts as a failure of its address, unless it
    /// served and its last call succeeded. Default 5 s:
    /// far longer than an accept-then-close takes, far shorter than a healthy connection lives.
    pub short_lived: Duration,
    /// Quiet time that takes one step off the count. Default 30 s (Envoy's base ejection time): an
    /// address at the 120 s cap (count 11) is forgiven after about 5.5 quiet minutes, and an
    /// address that failed once is forgotten 30 s after its backoff ends.
    pub decay_interval: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            short_lived: Duration::from_secs(5),
            decay_interval: Duration::from_secs(30),
        }
    }
}

impl EjectionPolicy {
    /// Checks the policy; see [`ConfigError`] for what is refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.decay_interval < Duration::from_millis(1) {
            return Err(ConfigError::DecayIntervalTooShort {
                interval: self.decay_interval,
            });
        }
        Ok(())
    }
}

/// The ejection state of one address, with time passed in as the offset since an origin the caller
/// keeps (the pool's creation). Pure: no clock, no runtime.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::{BackoffPolicy, Ejection, EjectionPolicy};
/// let (backoff, policy) = (BackoffPolicy::default(), EjectionPolicy::default());
/// let s = Duration::from_secs;
/// let mut e = Ejection::default();
/// assert_eq!(e.eject(s(0), &backoff, &policy, 0.5), s(1));
/// assert_eq!(e.eject(s(1), &backoff, &policy, 0.5), Duration::from_millis(1600));
/// assert_eq!(e.count_at(s(2), &policy), 2);
/// assert_eq!(e.retry_after(s(2)), Some(Duration::from_millis(600)));
/// // Quiet from 2.6 s on: one step off per 30 s.
/// assert_eq!(e.count_at(s(33), &policy), 1);
/// assert!(!e.is_settled(s(33), &policy));
/// assert!(e.is_settled(s(63), &policy));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ejection {
    count: u32,
    /// No connect before this offset.
    until: Duration,
    /// The offset from which the address has been quiet (the end of its last backoff, moved on by
    /// every decay step taken).
    quiet_since: Duration,
}

impl Ejection {
    /// The count at `now`, after the decay due by then.
    pub fn count_at(&self, now: Duration, policy: &EjectionPolicy) -> u32 {
        self.decayed(now, policy).count
    }

    /// Time left before the next connect may be made, if the address is backing off at `now`.
    pub fn retry_after(&self, now: Duration) -> Option<Duration> {
        (self.until > now).then(|| self.until - now)
    }

    /// When the backoff ends (an offset; in the past when not backing off).
    pub fn until(&self) -> Duration {
        self.until
    }

    /// One more failure at `now`: applies the decay due, raises the count and starts a backoff of
    /// `backoff.delay(count, unit)`, which it returns.
    pub fn eject(
        &mut self,
        now: Duration,
        backoff: &BackoffPolicy,
        policy: &EjectionPolicy,
        unit: f64,
    ) -> Duration {
        *self = self.decayed(now, policy);
        self.count = self.count.saturating_add(1);
        let delay = backoff.delay(self.count, unit);
        self.until = now.saturating_add(delay);
        self.quiet_since = self.until;
        delay
    }

    /// Ends the backoff and forgets the count (a topology signal says the server is back).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// `true` when nothing is left to remember at `now`: not backing off and the count decayed to
    /// zero. An address with no connection and no connect in flight in this state holds no state.
    pub fn is_settled(&self, now: Duration, policy: &EjectionPolicy) -> bool {
        self.until <= now && self.count_at(now, policy) == 0
    }

    fn decayed(&self, now: Duration, policy: &EjectionPolicy) -> Self {
        let mut next = *self;
        if next.count == 0 || now <= next.quiet_since {
            return next;
        }
        let interval = policy.decay_interval.max(Duration::from_millis(1));
        let quiet = now - next.quiet_since;
        let steps = quiet.as_nanos() / interval.as_nanos();
        let taken = u32::try_from(steps).unwrap_or(u32::MAX).min(next.count);
        next.count -= taken;
        next.quiet_since = next
            .quiet_since
            .saturating_add(interval.saturating_mul(taken));
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policies() -> (BackoffPolicy, EjectionPolicy) {
        (BackoffPolicy::default(), EjectionPolicy::default())
    }

    /// I12: the count grows with every failure, however close together, and a failure right after a
    /// backoff ends takes the next, longer one.
    #[test]
    fn i12_count_grows_and_the_delay_with_it() {
        let (backoff, policy) = policies();
        let mut e = Ejection::default();
        let mut now = Duration::ZERO;
        let mut last = Duration::ZERO;
        for k in 1..=20u32 {
            let delay = e.eject(now, &backoff, &policy, 0.5);
            assert_eq!(
                e.count_at(now, &policy),
                k,
                "I12 violated: count after {k} failures"
            );
            assert!(delay >= last, "I12 violated: delay shrank at k={k}");
            assert_eq!(delay, backoff.delay(k, 0.5));
            last = delay;
            now += delay; // the next failure comes as soon as the backoff allows
        }
        assert_eq!(last, S(120), "capped");
    }

    /// I12: decay is one step per quiet interval, counted from the end of the backoff, never during
    /// it, and exact at the edges.
    #[test]
    fn i12_decay_one_step_per_quiet_interval() {
        let (backoff, policy) = policies();
        let mut e = Ejection::default();
        for _ in 0..3 {
            e.eject(Duration::ZERO, &backoff, &policy, 0.5);
        }
        let end = e.until();
        assert_eq!(end, backoff.delay(3, 0.5));
        assert_eq!(
            e.count_at(end + S(30) - Duration::from_nanos(1), &policy),
            3
        );
        assert_eq!(e.count_at(end + S(30), &policy), 2);
        assert_eq!(e.count_at(end + S(89), &policy), 1);
        assert_eq!(e.count_at(end + S(90), &policy), 0);
        assert!(!e.is_settled(end + S(89), &policy));
        assert!(e.is_settled(end + S(90), &policy));
        // A failure after one step of decay continues from the decayed count.
        let mut f = e;
        f.eject(end + S(45), &backoff, &policy, 0.5);
        assert_eq!(
            f.count_at(end + S(45), &policy),
            3,
            "2 after decay, then +1"
        );
    }

    #[test]
    fn reset_forgets_everything() {
        let (backoff, policy) = policies();
        let mut e = Ejection::default();
        e.eject(S(5), &backoff, &policy, 0.5);
        assert!(e.retry_after(S(5)).is_some());
        e.reset();
        assert_eq!(e.retry_after(S(5)), None);
        assert!(e.is_settled(S(5), &policy));
    }

    #[test]
    fn total_on_extreme_times() {
        let (backoff, policy) = policies();
        let mut e = Ejection::default();
        for _ in 0..1000 {
            e.eject(Duration::MAX, &backoff, &policy, 1.0);
        }
        assert_eq!(e.until(), Duration::MAX);
        assert_eq!(e.count_at(Duration::MAX, &policy), 1000);
        let tiny = EjectionPolicy {
            decay_interval: Duration::from_millis(1),
            ..policy
        };
        let mut e = Ejection::default();
        e.eject(Duration::ZERO, &backoff, &tiny, 0.0);
        assert!(e.is_settled(Duration::MAX, &tiny));
    }

    /// The edges of `validate` (issue 17) and of `retry_after` and `is_settled`: the backoff's
    /// end instant itself is the first instant a connect may go (I12).
    #[test]
    fn i12_validation_and_the_end_of_a_backoff_are_exact() {
        let ms = Duration::from_millis(1);
        let ok = EjectionPolicy {
            decay_interval: ms,
            ..EjectionPolicy::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let short = ms - Duration::from_nanos(1);
        assert_eq!(
            EjectionPolicy {
                decay_interval: short,
                ..ok
            }
            .validate(),
            Err(ConfigError::DecayIntervalTooShort { interval: short })
        );
        let (backoff, policy) = policies();
        let mut e = Ejection::default();
        let delay = e.eject(S(10), &backoff, &policy, 0.5);
        assert_eq!(e.until(), S(10) + delay);
        assert_eq!(e.retry_after(S(10)), Some(delay));
        assert_eq!(e.retry_after(e.until() - ms), Some(ms));
        assert_eq!(
            e.retry_after(e.until()),
            None,
            "I12: the end is the first allowed instant"
        );
        assert!(!e.is_settled(e.until() - ms, &policy));
        assert_eq!(e.count_at(e.until(), &policy), 1);
    }
}
