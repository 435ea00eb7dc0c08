//! Property tests of the pure core (`keyed_pool::core`) and of config validation, against
//! statements restated from DESIGN.md. Cases: proptest's default (256) unless `PROPTEST_CASES`.

use std::time::Duration;

use keyed_pool::ConnectionMetrics;
use keyed_pool::core::{
    BackoffPolicy, CallRecord, Ejection, EjectionPolicy, HealthPolicy, HealthWindow, is_idle,
};
use keyed_pool::{ConnectionPool, PoolConfig};
use keyed_pool_proptests::config_check::{self, RawConfig, RawDuration};
use keyed_pool_proptests::model::{MEjection, grown_ns};
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

fn valid_multiplier() -> impl Strategy<Value = f64> {
    prop_oneof![1.0f64..=16.0, Just(1.0), Just(1.6), Just(2.0), Just(16.0)]
}

fn valid_backoff() -> impl Strategy<Value = BackoffPolicy> {
    (duration(), duration(), valid_multiplier(), 0.0f64..1.0).prop_map(
        |(a, b, multiplier, jitter)| {
            let base = a.max(MS);
            BackoffPolicy {
                base,
                max: b.max(base),
                multiplier,
                jitter,
            }
        },
    )
}

/// The un-jittered schedule at `k` for a policy, in nanoseconds (the model's restatement).
fn grown(p: &BackoffPolicy, k: u32) -> f64 {
    grown_ns(p.base, p.max, p.multiplier, k)
}

/// How far a window test's clock moves before a record: `gap` picks the kind (none, within a
/// bucket, within two windows, a power-of-two number of buckets up to 2^40, any number up to 2^40,
/// one bucket), `r` the amount, for buckets of `w` µs.
fn window_gap(gap: u8, r: u64, w: u64) -> u64 {
    match gap {
        0 => 0,
        1 => r % w,
        2 => r % (16 * w),
        3 => (w << (r % 41)).saturating_add(r % w),
        4 => w.saturating_mul(r % (1 << 40)),
        _ => w,
    }
}

/// `(successes, failures)` of the records of `history` whose bucket (of `w` µs) is in `buckets`:
/// what a window must count.
fn outcomes_in(
    history: &[(u64, bool)],
    buckets: std::ops::RangeInclusive<u64>,
    w: u64,
) -> (u64, u64) {
    history
        .iter()
        .filter(|&&(at, _)| buckets.contains(&(at / w)))
        .fold(
            (0, 0),
            |(s, f), &(_, ok)| if ok { (s + 1, f) } else { (s, f + 1) },
        )
}

proptest! {
    /// I12: for every k and draw the delay is `max(1 ms, g·(1 + j·(2·unit − 1)))` (g the
    /// un-jittered schedule `min(base·multiplier^(k−1), max)`), up to float rounding and saturating
    /// at u64 nanoseconds; so within `[g·(1−j), g·(1+j)]` and at least 1 ms.
    #[test]
    fn i12_backoff_follows_the_schedule_for_every_k(p in valid_backoff(), k in any::<u32>(), unit in 0.0f64..=1.0) {
        let d = p.delay(k, unit);
        prop_assert!(d >= MS, "I12 violated: delay({k}) = {d:?} < 1 ms");
        let g = grown(&p, k);
        let want = (g * (1.0 + p.jitter * (2.0 * unit - 1.0))).min(u64::MAX as f64).max(MS.as_nanos() as f64);
        let ns = d.as_nanos() as f64;
        let slack = 1e-9 * want + 1.0;
        prop_assert!((ns - want).abs() <= slack, "I12 violated: delay({k}, {unit}) = {d:?}, schedule {want} ns for {p:?}");
        let (lo, hi) = (g * (1.0 - p.jitter), g * (1.0 + p.jitter));
        prop_assert!(ns >= lo.min(u64::MAX as f64) - slack || d == MS, "I12 violated: delay({k}) = {d:?} below {lo} ns");
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

    /// I12: total on any policy at all (zero base, cap below base, NaN, infinite or out-of-range
    /// multiplier and jitter) and any draw (NaN, out of range): never panics, never zero.
    #[test]
    fn i12_backoff_total_on_any_policy(base in duration(), max in duration(), multiplier in any::<f64>(), jitter in any::<f64>(), k in any::<u32>(), unit in any::<f64>()) {
        let p = BackoffPolicy { base, max, multiplier, jitter };
        prop_assert!(p.delay(k, unit) >= MS);
    }

    /// I12: the ejection state of the core equals the model's restatement (`MEjection`) through
    /// any sequence of rises, resets (`mark_up`) and reads, at the edges of backoffs and decay
    /// steps: the count rises by one per failure after the decay due, falls by one per whole
    /// quiet `decay_interval` after the backoff ends, the backoff is `delay(count)` from the rise,
    /// and the state is settled exactly when not backing off with a count of zero.
    #[test]
    fn i12_ejection_rises_decays_and_resets_as_restated(
        p in valid_backoff().prop_filter("backoffs short enough to see decay", |p| p.max <= Duration::from_secs(600)),
        decay in prop_oneof![(1u64..100).prop_map(Duration::from_millis), (1u64..60).prop_map(Duration::from_secs), Just(MS)],
        steps in proptest::collection::vec((0u8..8, 0u64..5_000, 0.0f64..=1.0), 0..60),
    ) {
        let policy = EjectionPolicy { decay_interval: decay, ..EjectionPolicy::default() };
        let (mut e, mut m, mut now) = (Ejection::default(), MEjection::default(), Duration::ZERO);
        let ns = Duration::from_nanos(1);
        for (action, n, unit) in steps {
            // Where the clock goes: an arbitrary step, or onto (or 1 ns about) the end of the
            // backoff or the next decay step.
            let next_decay = {
                let quiet = now.saturating_sub(m.until).as_nanos() / decay.as_nanos();
                m.until + Duration::from_nanos((decay.as_nanos() * (quiet + 1)) as u64)
            };
            let target = match action {
                0 | 1 => now + Duration::from_millis(n),
                2 => m.until,
                3 => m.until + ns,
                4 => next_decay - ns,
                5 => next_decay,
                _ => now,
            };
            now = now.max(target);
            match action % 3 {
                0 => {
                    let count = m.count_at(decay, now) + 1;
                    let delay = e.eject(now, &p, &policy, unit);
                    let g = grown(&p, count);
                    let want = (g * (1.0 + p.jitter * (2.0 * unit - 1.0))).max(MS.as_nanos() as f64);
                    prop_assert!((delay.as_nanos() as f64 - want).abs() <= 1e-9 * want + 1.0,
                        "I12 violated: rise to {count} at {now:?} backs off {delay:?}, schedule {want} ns");
                    m = MEjection { count, until: now + delay };
                }
                1 if n % 7 == 0 => {
                    e.reset();
                    m = MEjection::default();
                }
                _ => {}
            }
            for at in [now, now + ns, m.until, m.until + ns, next_decay - ns, next_decay] {
                let at = at.max(now);
                prop_assert_eq!(e.count_at(at, &policy), m.count_at(decay, at), "I12 violated: count at {:?} ({:?})", at, m);
                prop_assert_eq!(e.retry_after(at), m.backing_off(at).then(|| m.until - at), "I12 violated: backoff at {:?} ({:?})", at, m);
                prop_assert_eq!(e.is_settled(at, &policy), m.settled(decay, at), "I18 violated: settled at {:?} ({:?})", at, m);
            }
        }
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

    /// I9/I11: the sliding window is exact. Read at or after its newest record, it counts exactly
    /// the outcomes, from the full history, whose bucket (`window / 8` wide) is one of the eight
    /// ending at the read's; whatever the gaps between records (up to 2^40 bucket widths, where a
    /// tag of the epoch modulo 2^24 once let old failures come back) and in whatever order they
    /// arrive (a late record never erases newer outcomes). Read before its newest record, it counts
    /// those buckets that are also within a window of the newest (older outcomes have slid out).
    #[test]
    fn health_window_equals_the_full_history(
        window_ms in prop_oneof![Just(1u64), Just(8), 1u64..20_000],
        records in proptest::collection::vec((0u8..6, any::<u64>(), 0u8..4, any::<bool>()), 0..80),
    ) {
        let window = Duration::from_millis(window_ms);
        let w = (window.as_micros() as u64 / 8).max(1);
        let mut hw = HealthWindow::default();
        let mut history: Vec<(u64, bool)> = Vec::new();
        let mut t = 0u64;
        for (gap, r, late, success) in records {
            t = t.saturating_add(window_gap(gap, r, w));
            // A quarter arrive late: up to two windows before the newest.
            let at = if late == 0 { t.saturating_sub(r % (16 * w)) } else { t };
            hw.record(window, at, success);
            history.push((at, success));
            let newest = history.iter().map(|&(at, _)| at / w).max().unwrap_or(0);
            let reads = [
                newest * w,
                t,
                t.saturating_add(w - 1),
                t.saturating_add(7 * w),
                t.saturating_add(8 * w),
                t.saturating_add(r % (1 << 20)),
                t.saturating_sub(r % (4 * w)),
            ];
            for read in reads {
                let epoch = read / w;
                // The eight buckets ending at the read's, and, for a read in the past, only those
                // within a window of the newest record.
                let oldest = epoch.saturating_sub(7).max(newest.saturating_sub(7));
                let want = outcomes_in(&history, oldest..=epoch, w);
                prop_assert_eq!(hw.counts(window, read), want, "I9 violated: window {:?} read at {} (bucket {}, newest {}) after {:?}", window, read, epoch, newest, history);
            }
        }
    }

    /// I9/I11 with the failure side allocated late (issue 16: a window keeps its failure buckets,
    /// and a record its failure-side state, in a box allocated by the first failure): many
    /// successes first, sliding the window over many buckets (and gaps of up to 2^40 widths) with
    /// no failure side to clear, then a mixed history with late records. The window alone
    /// (`HealthWindow`) and the record (`CallRecord`, whose failure buckets share the box of its
    /// counts) both count exactly what the full history gives, at and after every record; the
    /// record's failure count and run are exact too (I10).
    #[test]
    fn health_window_with_a_failure_side_allocated_late_equals_the_full_history(
        window_ms in prop_oneof![Just(1u64), Just(8), 1u64..20_000],
        successes in 1usize..400,
        records in proptest::collection::vec((0u8..6, any::<u64>(), 0u8..4, any::<bool>()), 1..80),
    ) {
        let window = Duration::from_millis(window_ms);
        let policy = HealthPolicy { window, consecutive_failures: 0, min_requests: u32::MAX, ..HealthPolicy::default() };
        let w = (window.as_micros() as u64 / 8).max(1);
        let mut hw = HealthWindow::default();
        let mut record = CallRecord::default();
        let mut history: Vec<(u64, bool)> = Vec::new();
        let mut t = 0u64;
        // The successes first (the first records), then the given history, its first record a
        // failure so that the failure side starts there.
        let steps = (0..successes)
            .map(|i| (if i % 50 == 49 { 3 } else { (i % 3) as u8 }, (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), 1, true))
            .chain(records.iter().enumerate().map(|(i, &(gap, r, late, ok))| (gap, r, late, ok && i > 0)));
        for (gap, r, late, success) in steps {
            t = t.saturating_add(window_gap(gap, r, w));
            let at = if late == 0 { t.saturating_sub(r % (16 * w)) } else { t };
            hw.record(window, at, success);
            if success {
                record.success(&policy, Duration::from_micros(at), MS);
            } else {
                record.failure(&policy, Duration::from_micros(at));
            }
            history.push((at, success));
            let failed = history.iter().filter(|&&(_, ok)| !ok).count() as u64;
            let run = history.iter().rev().take_while(|&&(_, ok)| !ok).count() as u32;
            prop_assert_eq!((record.successes(), record.failures()), (history.len() as u64 - failed, failed), "I13 violated");
            prop_assert_eq!(record.consecutive_failures(), run, "I10 violated after {:?}", history);
            let newest = history.iter().map(|&(at, _)| at / w).max().unwrap_or(0);
            for read in [newest * w, t, t.saturating_add(w - 1), t.saturating_add(7 * w), t.saturating_add(8 * w)] {
                let epoch = read / w;
                let oldest = epoch.saturating_sub(7).max(newest.saturating_sub(7));
                let want = outcomes_in(&history, oldest..=epoch, w);
                prop_assert_eq!(hw.counts(window, read), want, "I11 violated: window {:?} read at {} after {:?}", window, read, history);
                prop_assert_eq!(record.window_counts(&policy, Duration::from_micros(read)), want, "I11 violated (record): window {:?} read at {} after {:?}", window, read, history);
            }
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
                Just(4096),
                Just(8192),
                any::<u64>()
            ],
        ),
        (
            any::<u32>(),
            float(),
            (any::<u32>(), any::<u64>(), any::<u64>()),
        ),
        (
            proptest::option::of(prop_oneof![
                valid_multiplier(),
                float(),
                Just(0.5),
                Just(17.0)
            ]),
            proptest::option::of(raw_duration()),
            proptest::option::of(raw_duration()),
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
                (multiplier, short_lived, decay_interval),
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
                multiplier,
                short_lived,
                decay_interval,
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
    for multiplier in [0.5, 16.5, f64::NAN, f64::INFINITY] {
        let mut c = PoolConfig::default();
        c.backoff.multiplier = multiplier;
        assert!(matches!(
            ConnectionPool::builder().config(c).build::<u32>(),
            Err(ConfigError::MultiplierOutOfRange { .. })
        ));
    }
    let mut c = PoolConfig::default();
    c.ejection.decay_interval = Duration::from_micros(999);
    assert!(matches!(
        c.validate(),
        Err(ConfigError::DecayIntervalTooShort { .. })
    ));
    // The builder's `backoff(base, max, jitter)` keeps the multiplier.
    let pool = ConnectionPool::builder()
        .backoff_policy(BackoffPolicy {
            multiplier: 3.0,
            ..BackoffPolicy::default()
        })
        .backoff(MS, Duration::from_secs(1), 0.1)
        .build::<u32>()
        .expect("valid");
    assert_eq!(pool.config().backoff.multiplier, 3.0);
    assert!(PoolConfig::default().validate().is_ok());
}
