use std::time::Duration;

/// The idle predicate (I5, I6): a connection is idle when no call is in flight and it has not been
/// used for *longer than* `max_idle`. At exactly `max_idle` it is still fresh.
///
/// `max_idle == None` disables idle eviction.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::is_idle;
/// let max = Some(Duration::from_secs(60));
/// assert!(!is_idle(0, Duration::from_secs(60), max));
/// assert!(is_idle(0, Duration::from_secs(60) + Duration::from_micros(1), max));
/// assert!(!is_idle(1, Duration::from_secs(3600), max), "a call in flight is never idle");
/// assert!(!is_idle(0, Duration::from_secs(3600), None));
/// ```
pub fn is_idle(in_flight: u64, since_last_use: Duration, max_idle: Option<Duration>) -> bool {
    match max_idle {
        Some(max) => in_flight == 0 && since_last_use > max,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i5_i6_idle_only_past_max_idle_with_no_call_in_flight() {
        let max = Duration::from_secs(60);
        let just_past = max + Duration::from_nanos(1);
        assert!(
            !is_idle(0, max, Some(max)),
            "I5: at exactly max_idle it is fresh"
        );
        assert!(
            is_idle(0, just_past, Some(max)),
            "I6: past max_idle it is idle"
        );
        assert!(
            !is_idle(1, just_past * 100, Some(max)),
            "I5: a call in flight"
        );
        assert!(
            !is_idle(0, Duration::MAX, None),
            "None disables idle eviction"
        );
    }
}
