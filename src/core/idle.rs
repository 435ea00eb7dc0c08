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
