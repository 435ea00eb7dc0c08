use std::time::Duration;

use crate::ConfigError;

/// The reconnect schedule of an address (I12): at ejection count `k` no new connect is made before
/// `min(base · multiplier^(k−1), max) · (1 + jitter)`, with the jitter drawn uniformly from
/// `±jitter`. (What raises and lowers `k` is [`Ejection`](crate::core::Ejection)'s.)
///
/// Defaults are gRPC's connection backoff: 1 s base, ×1.6, 120 s cap, ±20 % jitter. The gentle
/// multiplier reaches the cap after 11 ejections (about 5 minutes of failing), and the jitter spreads
/// the reconnects of many clients after a broker restart so they do not arrive as one storm.
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::BackoffPolicy;
/// let policy = BackoffPolicy::default();
/// // `unit` is the jitter draw in [0, 1]; 0.5 means no jitter.
/// assert_eq!(policy.delay(1, 0.5), Duration::from_secs(1));
/// assert_eq!(policy.delay(3, 0.5), Duration::from_millis(2560));
/// assert_eq!(policy.delay(100, 0.5), Duration::from_secs(120));
/// assert_eq!(policy.delay(u32::MAX, 1.0), Duration::from_secs(144));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackoffPolicy {
    /// Delay after the first failure. Must be at least 1 ms.
    pub base: Duration,
    /// Cap of the delay before jitter. Must be `>= base`.
    pub max: Duration,
    /// Growth factor per ejection, in `[1, 16]`.
    pub multiplier: f64,
    /// Relative jitter in `[0, 1)`: `0.2` means ±20 %.
    pub jitter: f64,
}

/// The shortest delay the schedule ever returns: a zero delay would turn backoff into a busy loop,
/// and madsim's timers have a 1 ms resolution.
pub(crate) const MIN_DELAY: Duration = Duration::from_millis(1);

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(120),
            multiplier: 1.6,
            jitter: 0.2,
        }
    }
}

impl BackoffPolicy {
    /// Checks the policy; see [`ConfigError`] for what is refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.base < MIN_DELAY {
            return Err(ConfigError::BackoffBaseTooSmall { base: self.base });
        }
        if self.max < self.base {
            return Err(ConfigError::BackoffMaxBelowBase {
                base: self.base,
                max: self.max,
            });
        }
        if !(1.0..=16.0).contains(&self.multiplier) {
            return Err(ConfigError::MultiplierOutOfRange {
                multiplier: self.multiplier,
            });
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(ConfigError::JitterOutOfRange {
                jitter: self.jitter,
            });
        }
        Ok(())
    }

    /// The delay after the `k`-th consecutive failure (`k = 0` is treated as 1), with the jitter draw
    /// `unit ∈ [0, 1]` mapped to a factor `1 + jitter · (2·unit − 1)`; out-of-range or NaN draws are
    /// clamped. Total for every `k` and every policy: never panics or overflows (it saturates), never
    /// returns less than 1 ms, and for a fixed `unit` never shrinks as `k` grows.
    pub fn delay(&self, k: u32, unit: f64) -> Duration {
        let base = self.base.as_secs_f64();
        let max = self.max.as_secs_f64().max(base);
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.clamp(1.0, 16.0)
        } else {
            1.0
        };
        // The growth is computed in floating point and capped: powi of a bounded exponent never
        // overflows to NaN, and `min` keeps it at the cap (infinity included).
        let exponent = k.saturating_sub(1).min(4096) as i32;
        let grown = (base * multiplier.powi(exponent)).min(max);
        let unit = if unit.is_nan() {
            0.5
        } else {
            unit.clamp(0.0, 1.0)
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 0.999_999)
        } else {
            0.0
        };
        let factor = 1.0 + jitter * (2.0 * unit - 1.0);
        let ns = (grown * factor * 1e9).min(u64::MAX as f64);
        Duration::from_nanos(ns as u64).max(MIN_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Vec<BackoffPolicy> {
        let d = Duration::from_millis;
        vec![
            BackoffPolicy::default(),
            BackoffPolicy {
                base: d(1),
                max: d(1),
                multiplier: 2.0,
                jitter: 0.0,
            },
            BackoffPolicy {
                base: d(1),
                max: Duration::MAX,
                multiplier: 16.0,
                jitter: 0.999,
            },
            BackoffPolicy {
                base: Duration::MAX,
                max: Duration::MAX,
                multiplier: 1.0,
                jitter: 0.5,
            },
            BackoffPolicy {
                base: d(250),
                max: Duration::from_secs(3600),
                multiplier: 1.6,
                jitter: 0.2,
            },
        ]
    }

    fn ks() -> impl Iterator<Item = u32> {
        (0..=300).chain(u32::MAX - 300..=u32::MAX)
    }

    #[test]
    fn i12_delay_is_total_nonzero_and_never_shrinks_for_every_k() {
        for policy in policies() {
            for unit in [0.0, 0.25, 0.5, 0.75, 1.0, -3.0, 7.0, f64::NAN] {
                let mut previous = Duration::ZERO;
                for k in ks() {
                    let delay = policy.delay(k, unit);
                    assert!(
                        delay >= MIN_DELAY,
                        "I12 violated: zero delay at k={k} {policy:?}"
                    );
                    assert!(
                        delay >= previous,
                        "I12 violated: delay shrank at k={k} ({previous:?} -> {delay:?}) {policy:?}"
                    );
                    previous = delay;
                }
            }
        }
    }

    #[test]
    fn i12_delay_follows_the_formula_within_the_jitter_band() {
        let policy = BackoffPolicy::default();
        for k in 1..=20u32 {
            let nominal = policy.base.as_secs_f64() * 1.6f64.powi(k as i32 - 1);
            let capped = nominal.min(policy.max.as_secs_f64());
            for unit in [0.0, 0.5, 1.0] {
                let got = policy.delay(k, unit).as_secs_f64();
                let want = capped * (1.0 + policy.jitter * (2.0 * unit - 1.0));
                assert!(
                    (got - want).abs() < 1e-6,
                    "k={k} unit={unit}: {got} != {want}"
                );
            }
        }
        assert_eq!(
            policy.delay(0, 0.5),
            policy.delay(1, 0.5),
            "k = 0 is treated as 1"
        );
    }

    #[test]
    fn validation_refuses_nonsense() {
        let d = Duration::from_millis;
        let bad = [
            BackoffPolicy {
                base: Duration::ZERO,
                ..Default::default()
            },
            BackoffPolicy {
                base: d(10),
                max: d(5),
                ..Default::default()
            },
            BackoffPolicy {
                multiplier: 0.5,
                ..Default::default()
            },
            BackoffPolicy {
                multiplier: f64::NAN,
                ..Default::default()
            },
            BackoffPolicy {
                jitter: 1.0,
                ..Default::default()
            },
            BackoffPolicy {
                jitter: -0.1,
                ..Default::default()
            },
            BackoffPolicy {
                jitter: f64::NAN,
                ..Default::default()
            },
        ];
        for policy in bad {
            assert!(policy.validate().is_err(), "{policy:?} must be refused");
        }
        assert!(BackoffPolicy::default().validate().is_ok());
    }

    /// The edges of every bound of `validate` (issue 17: `<` → `<=` survived): each bound's own
    /// value is accepted, the value just past it is refused, with the error that names it.
    #[test]
    fn i12_validation_accepts_each_bound_and_refuses_just_past_it() {
        let ok = |p: BackoffPolicy| assert_eq!(p.validate(), Ok(()), "{p:?} must be accepted");
        let us = Duration::from_micros;
        // base == MIN_DELAY (1 ms), max == base, multiplier at 1 and at 16, jitter at 0.
        ok(BackoffPolicy {
            base: MIN_DELAY,
            max: MIN_DELAY,
            multiplier: 1.0,
            jitter: 0.0,
        });
        ok(BackoffPolicy {
            multiplier: 16.0,
            jitter: 0.999,
            ..Default::default()
        });
        let base = BackoffPolicy::default().base;
        ok(BackoffPolicy {
            max: base,
            ..Default::default()
        });
        assert_eq!(
            BackoffPolicy {
                base: us(999),
                max: us(999),
                ..Default::default()
            }
            .validate(),
            Err(ConfigError::BackoffBaseTooSmall { base: us(999) })
        );
        assert_eq!(
            BackoffPolicy {
                max: base - us(1),
                ..Default::default()
            }
            .validate(),
            Err(ConfigError::BackoffMaxBelowBase {
                base,
                max: base - us(1)
            })
        );
        assert_eq!(
            BackoffPolicy {
                multiplier: 16.001,
                ..Default::default()
            }
            .validate(),
            Err(ConfigError::MultiplierOutOfRange { multiplier: 16.001 })
        );
        assert_eq!(
            BackoffPolicy {
                multiplier: 0.999,
                ..Default::default()
            }
            .validate(),
            Err(ConfigError::MultiplierOutOfRange { multiplier: 0.999 })
        );
    }

    /// The jitter band is symmetric around the nominal delay: unit 0 is `-jitter`, unit 1 is
    /// `+jitter`, unit 0.5 is the nominal delay, and out-of-range units clamp to the ends.
    #[test]
    fn i12_jitter_spans_the_band_and_clamps_out_of_range_units() {
        let p = BackoffPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.5,
        };
        assert_eq!(p.delay(1, 0.0), Duration::from_secs(5));
        assert_eq!(p.delay(1, 0.5), Duration::from_secs(10));
        assert_eq!(p.delay(1, 1.0), Duration::from_secs(15));
        assert_eq!(p.delay(1, -1.0), Duration::from_secs(5));
        assert_eq!(p.delay(1, 2.0), Duration::from_secs(15));
        assert_eq!(p.delay(1, f64::NAN), Duration::from_secs(10));
        // max below base is read as max == base; a multiplier outside 1..=16 is clamped into it.
        let q = BackoffPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_millis(1),
            multiplier: 100.0,
            jitter: 0.0,
        };
        assert_eq!(q.delay(5, 0.5), Duration::from_secs(1));
        let r = BackoffPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1000),
            multiplier: 100.0,
            jitter: 0.0,
        };
        assert_eq!(r.delay(2, 0.5), Duration::from_secs(16));
        let nan = BackoffPolicy {
            multiplier: f64::NAN,
            jitter: f64::NAN,
            ..r
        };
        assert_eq!(nan.delay(3, 1.0), Duration::from_secs(1));
    }
}
