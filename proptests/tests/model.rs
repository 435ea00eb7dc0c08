//! The pool against the reference model: random op sequences on paused virtual time, every
//! invariant checked by number after every op (see `keyed_pool_proptests::harness`). A failure is
//! shrunk to a minimal sequence and saved in `model.proptest-regressions`.
//!
//! Cases: 1024 short and 64 long sequences by default; `PROPTEST_CASES=N` sets both.

use keyed_pool_proptests::ops::{self, Edge, Knobs, Op, Scenario, Step};
use keyed_pool_proptests::run;
use proptest::prelude::*;
use proptest::test_runner::Config;

fn cases(default: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        max_shrink_iters: 20_000,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(cases(1024))]

    /// Every invariant the serial model checks (I1–I3, I5–I14, I16, I17), on sequences of up to
    /// 80 ops over every configuration the knobs offer.
    #[test]
    fn pool_matches_model(scenario in ops::scenario(80)) {
        if let Err(violation) = run(&scenario) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

proptest! {
    #![proptest_config(cases(64))]

    /// Fewer, longer sequences: states far from the start (many replacements, long backoff runs,
    /// windows that have slid many times).
    #[test]
    fn pool_matches_model_on_long_runs(scenario in ops::scenario(600)) {
        if let Err(violation) = run(&scenario) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

/// Hand-written sequences at the edges, so they are covered on every run whatever the random draw.
#[test]
fn edges_of_idle_health_and_backoff() {
    let knobs = Knobs::default(); // max_idle 1 s, threshold 5, backoff 1 s .. 120 s, no jitter
    let a = 0;
    let scenarios = [
        // I5/I6 at max_idle: fresh at exactly max_idle, idle 1 ms later.
        vec![
            Op::Insert { addr: a },
            Op::Advance(Step::MaxIdle(Edge::At)),
            Op::EvictIdle,
            Op::Advance(Step::Millis(1)),
            Op::EvictIdle,
        ],
        // I5: a call in flight is never idle.
        vec![
            Op::Insert { addr: a },
            Op::Begin { handle: 0 },
            Op::Advance(Step::Millis(60_000)),
            Op::EvictIdle,
            Op::Finish {
                call: 0,
                how: ops::Finish::Success,
            },
            Op::EvictIdle,
            Op::Advance(Step::MaxIdle(Edge::After)),
            Op::EvictIdle,
        ],
        // I9/I10/I12: five failures make it unhealthy; eviction backs the address off; the connect
        // at the edge of the backoff is refused 1 ms before and allowed at the deadline.
        std::iter::once(Op::Insert { addr: a })
            .chain((0..5).flat_map(|_| {
                [
                    Op::Begin { handle: 0 },
                    Op::Finish {
                        call: 0,
                        how: ops::Finish::Failure,
                    },
                ]
            }))
            .chain([
                Op::Get { addr: a },
                Op::EvictUnhealthy,
                Op::GetOrConnect {
                    addr: a,
                    script: ops::ConnectScript::Ok,
                },
                Op::Advance(Step::Backoff {
                    addr: a,
                    edge: Edge::Before,
                }),
                Op::GetOrConnect {
                    addr: a,
                    script: ops::ConnectScript::Ok,
                },
                Op::Advance(Step::Millis(1)),
                Op::GetOrConnect {
                    addr: a,
                    script: ops::ConnectScript::Fail,
                },
                Op::Advance(Step::Backoff {
                    addr: a,
                    edge: Edge::At,
                }),
                Op::GetOrConnect {
                    addr: a,
                    script: ops::ConnectScript::Hang,
                },
                Op::Advance(Step::Backoff {
                    addr: a,
                    edge: Edge::After,
                }),
                Op::GetOrConnect {
                    addr: a,
                    script: ops::ConnectScript::Slow,
                },
                Op::Close,
            ])
            .collect(),
        // I14: a stale handle never removes its successor.
        vec![
            Op::Insert { addr: a },
            Op::Insert { addr: a },
            Op::RemoveConnection { handle: 0 },
            Op::RemoveConnection { handle: 1 },
        ],
    ];
    for ops in scenarios {
        let scenario = Scenario { knobs, ops };
        if let Err(violation) = run(&scenario) {
            panic!("{violation}\n{scenario:?}");
        }
    }
}
