//! Property tests of the pure core (`keyed_pool::core`) and of config validation, against
//! statements restated from DESIGN.md. Cases: proptest's default (256) unless `PROPTEST_CASES`.

use std::time::Duration;

use keyed_pool::ConnectionMetrics;
use keyed_pool::core::{BackoffPolicy, HealthPolicy, HealthWindow, is_idle};
use keyed_pool::{ConnectionPool, PoolConfig};
use keyed_pool_proptests::config_check::{self, RawConfig, RawDuration};
use proptest::prelude::*;
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (0u64..2_000_000).prop_map(Duration::from_nanos),
        (0u64..200_000).prop_map(Duration::from_millis),
        (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        Just(Duration::MAX),
        Just(Duration::ZERO),
        Just(MS),
    ]
}

fn valid_backoff() -> impl Strategy<Value = BackoffPolicy> {
    (duration(), duration(), 0.0f64..1.0).prop_map(|(a, b, jitter)| {
        let base = a.max(MS);
        BackoffPolicy {
            base,
            max: b.max(base),
            jitter,
        }
    })
}

/// `min(base·2^(k−1), max)` in exact integer arithmetic (k = 0 counts as 1).
fn grown(p: &BackoffPolicy, k: u32) -> u128 {
    let exp = k.max(1) - 1;
    let cap = p.max.as_nanos();
    if exp >= 100 {
        return cap;
    }
    p.base
        .as_nanos()
        .checked_mul(1u128 << exp)
        .map_or(cap, |g| g.min(cap))
}

proptest! {
    /// I12: for every k and draw the delay is within `[g·(1−j), g·(1+j)]` (g the un-jittered
    /// schedule, up to float rounding, saturating at u64 nanoseconds) and at least 1 ms.
    #[test]
    fn i12_backoff_within_its_bounds_for_every_k(p in valid_backoff(), k in any::<u32>(), unit in 0.0f64..=1.0) {
        let d = p.delay(k, unit);
        prop_assert!(d >= MS, "I12 violated: delay({k}) = {d:?} < 1 ms");
        let g = grown(&p, k) as f64;
        let (lo, hi) = (g * (1.0 - p.jitter), g * (1.0 + p.jitter));
        let ns = d.as_nanos() as f64;
        let slack = 1e-9 * hi + 1.0;
        let ceiling = u64::MAX as f64;
        prop_assert!(ns >= lo.min(ceiling) - slack || d == MS, "I12 violated: delay({k}) = {d:?} below {lo} ns");
        prop_assert!(ns <= hi.max(MS.as_nanos() as f64) + slack, "I12 violated: delay({k}) = {d:?} above {hi} ns");
    }

    /// I12: for a fixed jitter draw the delay never shrinks as k grows (checked on a run of k).
    #[test]
    fn i12_backoff_never_shrinks_in_k(p in valid_backoff(), k0 in any::<u32>(), unit in 0.0f64..=1.0) {
        let mut prev = p.delay(k0, unit);
        for k in k0.saturating_add(1)..=k0.saturating_add(70) {
            let d = p.delay(k, unit);
            prop_assert!(d >= prev, "I12 violated: delay({k}) = {d:?} < delay({}) = {prev:?}", k - 1);
            prev = d;
        }
    }

    /// I12: total on any policy at all (zero base, cap below base, NaN or infinite jitter) and any
    /// draw (NaN, out of range): never panics, never zero.
    #[test]
    fn i12_backoff_total_on_any_policy(base in duration(), max in duration(), jitter in any::<f64>(), k in any::<u32>(), unit in any::<f64>()) {
        let p = BackoffPolicy { base, max, jitter };
        prop_assert!(p.delay(k, unit) >= MS);
    }

    /// I10/I11 on the verdict alone: the consecutive detector fires exactly at the threshold, the
    /// ratio detector never below the minimum volume.
    #[test]
    fn i10_i11_verdict(threshold in 0u32..10, ratio in 0.01f64..=1.0, min in 1u32..50, run in 0u32..20, ok in 0u64..60, bad in 0u64..60) {
        let p = HealthPolicy { consecutive_failures: threshold, failure_ratio: ratio, window: Duration::from_secs(10), min_requests: min };
        let v = p.verdict(run, (ok, bad)).is_unhealthy();
        let total = ok + bad;
        let by_run = threshold > 0 && run >= threshold;
        let by_ratio = total >= u64::from(min) && bad as f64 >= ratio * total as f64;
        prop_assert_eq!(v, by_run || by_ratio);
        if total < u64::from(min) && !by_run {
            prop_assert!(!v, "I11 violated: fired with {} calls below the minimum {}", total, min);
        }
    }

    /// The sliding window counts exactly the outcomes of the last 8 buckets (`window / 8` each).
    #[test]
    fn health_window_counts_the_last_eight_buckets(window_ms in 1u64..20_000, steps in proptest::collection::vec((0u64..3_000_000, any::<bool>()), 0..80)) {
        let window = Duration::from_millis(window_ms);
        let w = (window.as_micros() as u64 / 8).max(1);
        let hw = HealthWindow::default();
        let mut now = 0u64;
        let mut seen: Vec<(u64, bool)> = Vec::new();
        for (advance, success) in steps {
            now += advance % (window.as_micros() as u64 * 2 + 1);
            hw.record(window, now, success);
            seen.push((now, success));
            let expect = seen.iter().filter(|(t, _)| now / w - t / w < 8).fold((0, 0), |(s, f), &(_, ok)| if ok { (s + 1, f) } else { (s, f + 1) });
            prop_assert_eq!(hw.counts(window, now), expect);
        }
    }

    /// I10 through a connection's metrics: the consecutive count is the trailing failure run, and
    /// a connection tripped once stays unhealthy (latched, I9).
    #[test]
    fn i10_consecutive_is_the_trailing_run(outcomes in proptest::collection::vec(any::<bool>(), 0..60), threshold in 0u32..8) {
        let health = HealthPolicy { consecutive_failures: threshold, min_requests: 1_000, ..HealthPolicy::default() };
        let t0 = Instant::now();
        let m = ConnectionMetrics::new(t0, health);
        let mut run = 0;
        let mut tripped = false;
        for (i, &ok) in outcomes.iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            if ok {
                m.record_success_at(now, MS);
                run = 0;
            } else {
                run += 1;
                tripped |= m.record_error_at(now).is_unhealthy();
            }
            prop_assert_eq!(m.consecutive_errors(), run, "I10 violated after {:?}", &outcomes[..=i]);
            prop_assert_eq!(tripped, threshold > 0 && outcomes[..=i].split(|&ok| ok).any(|r| r.len() as u32 >= threshold));
            prop_assert_eq!(m.is_healthy(), !tripped, "I9: the verdict is latched");
        }
    }

    /// I5/I6: the idle predicate is exactly "nothing in flight and unused for longer than
    /// max_idle", including at the edges.
    #[test]
    fn i5_i6_idle_predicate(in_flight in prop_oneof![Just(0u64), Just(1u64), any::<u64>()], max in duration(), delta in -2i64..=2, max_idle_on in any::<bool>()) {
        let since = if delta < 0 { max.saturating_sub(Duration::from_nanos(delta.unsigned_abs())) } else { max.saturating_add(Duration::from_nanos(delta as u64)) };
        let max_idle = max_idle_on.then_some(max);
        prop_assert_eq!(is_idle(in_flight, since, max_idle), max_idle_on && in_flight == 0 && since > max);
    }

    /// Config validation: `Ok` exactly when every rule holds; otherwise a typed error naming a
    /// broken rule; building never panics (the whole check is shared with the `config` fuzz target).
    #[test]
    fn config_validation_is_total_and_typed(raw in raw_config()) {
        config_check::check(&raw);
    }
}

fn raw_duration() -> impl Strategy<Value = RawDuration> {
    prop_oneof![
        any::<u32>().prop_map(RawDuration::Nanos),
        any::<u16>().prop_map(RawDuration::Millis),
        duration().prop_map(RawDuration::Any),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        0.0f64..=1.0,
        Just(0.0),
        Just(1.0),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(-0.5),
        Just(1.5),
        any::<f64>(),
    ]
}

fn raw_config() -> impl Strategy<Value = RawConfig> {
    (
        (
            any::<u16>(),
            proptest::option::of(raw_duration()),
            0u32..8,
            float(),
            raw_duration(),
            0u32..30,
        ),
        (
            raw_duration(),
            raw_duration(),
            float(),
            raw_duration(),
            any::<bool>(),
            prop_oneof![
                Just(32u64),
                Just(0),
                Just(1),
                Just(3),
                Just(64),
                any::<u64>()
            ],
        ),
        (
            any::<u32>(),
            float(),
            (any::<u32>(), any::<u64>(), any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (
                    max_connections,
                    max_idle,
                    consecutive_failures,
                    failure_ratio,
                    window,
                    min_requests,
                ),
                (base, cap, jitter, connect_timeout, lru, shard_amount),
                (k, unit, verdict),
            )| RawConfig {
                max_connections,
                max_idle,
                consecutive_failures,
                failure_ratio,
                window,
                min_requests,
                base,
                cap,
                jitter,
                connect_timeout,
                lru,
                shard_amount,
                k,
                unit,
                verdict,
            },
        )
}

/// The examples DESIGN.md names: zero interval, window of zero, ratio > 1 are typed errors.
#[test]
fn named_nonsense_is_a_typed_error() {
    use keyed_pool::ConfigError;
    let mut c = PoolConfig::default();
    c.health.window = Duration::ZERO;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::WindowTooShort { .. })
    ));
    let mut c = PoolConfig::default();
    c.health.failure_ratio = 1.5;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::FailureRatioOutOfRange { .. })
    ));
    let mut c = PoolConfig::default();
    c.backoff.jitter = f64::NAN;
    let built = ConnectionPool::builder().config(c).build::<u32>();
    assert!(matches!(built, Err(ConfigError::JitterOutOfRange { .. })));
    assert!(PoolConfig::default().validate().is_ok());
}
