//! The pool against the reference model: random op sequences on paused virtual time, every
//! invariant checked by number after every op (see `keyed_pool_proptests::harness`). A failure is
//! shrunk to a minimal sequence and saved in `model.proptest-regressions`.
//!
//! Cases: 1024 short and 64 long sequences by default; `PROPTEST_CASES=N` sets both.

use std::time::Duration;

use keyed_pool::{ConnectionPool, PoolError};
use keyed_pool_proptests::ops::{self, ConnectScript, Edge, Knobs, Op, Scenario, Step};
use keyed_pool_proptests::{FakeConn, Pool, ScriptedConnector, addr, run};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

/// The config of both properties: `PROPTEST_CASES` or `default` cases; everything else, the RNG
/// seed CI fixes with `PROPTEST_RNG_SEED` included, from proptest's environment-aware default.
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

    /// Every invariant the serial model checks (I1–I3, I5–I14, I16–I18), on sequences of up to
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

proptest! {
    #![proptest_config(cases(512))]

    /// Exclusive checkout in the operation model (issue 13): checkouts that wait in line across
    /// ops and virtual time, returns (broken or not, racing a cancelled waiter), dropped waiters,
    /// servers that refuse, mixed with every shared op, under a small global cap and every
    /// `max_per_address`: I1, I19 (per-address cap), I20 (one holder), I21 (FIFO, a failed
    /// connect fails the oldest caller only, no starvation while room exists), I22 (nothing
    /// lost, cancelled waiters included), typed errors at the deadline (I16), I12, I17.
    #[test]
    fn checkouts_match_model(scenario in ops::checkout_scenario(120)) {
        if let Err(violation) = run(&scenario) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

proptest! {
    #![proptest_config(cases(32))]

    /// Fewer, longer checkout sequences: long lines, many hand-overs, backoffs and sweeps.
    #[test]
    fn checkouts_match_model_on_long_runs(scenario in ops::checkout_scenario(600)) {
        if let Err(violation) = run(&scenario) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Several shared connections per address in the operation model (issue 13, I23): calls held
    /// in flight across ops make every connection of an address busy, a `get_or_connect` hit then
    /// connects another in the background (one at a time, I4; under the cap, I1, never making
    /// room; not while backing off, I12), and the model predicts which connection every `get` and
    /// `get_or_connect` hands out (the least loaded, the oldest of equals), what sweeps, removals
    /// by id (I14), inserts, `clear` and `close` (I17) do to each, and the connector's books.
    #[test]
    fn shared_connections_match_model(scenario in ops::shared_scenario(100)) {
        if let Err(violation) = run(&scenario) {
            return Err(TestCaseError::fail(violation));
        }
    }
}

proptest! {
    #![proptest_config(cases(16))]

    /// Fewer, longer sequences of several shared connections per address: addresses that grow,
    /// shrink by sweeps and removals, and grow again.
    #[test]
    fn shared_connections_match_model_on_long_runs(scenario in ops::shared_scenario(600)) {
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
        // I12: a server that accepts and closes at once backs off like one that refuses, and a
        // successful connect does not reset the count: 1 s, 1.6 s, 2.56 s ...
        vec![
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Ok,
            },
            Op::DropTransport { handle: 0 },
            Op::EvictUnhealthy,
            Op::Advance(Step::Backoff {
                addr: a,
                edge: Edge::At,
            }),
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Ok,
            },
            Op::DropTransport { handle: 1 },
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Ok,
            },
            Op::Advance(Step::Backoff {
                addr: a,
                edge: Edge::After,
            }),
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Fail,
            },
            Op::Advance(Step::Backoff {
                addr: a,
                edge: Edge::At,
            }),
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Hang,
            },
        ],
        // I12 at `short_lived`: closed 1 ms before it counts as a failure, at it does not.
        vec![
            Op::Insert { addr: a },
            Op::Advance(Step::ShortLived {
                handle: 0,
                edge: Edge::Before,
            }),
            Op::MarkClosed { handle: 0 },
            Op::EvictUnhealthy,
            Op::Insert { addr: a },
            Op::Advance(Step::ShortLived {
                handle: 1,
                edge: Edge::At,
            }),
            Op::MarkClosed { handle: 1 },
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Ok,
            },
        ],
        // I12/I18: the count decays one step per quiet interval after the backoff ends, exactly at
        // the step; a settled address stays tracked until a prune, then leaves; `mark_up` forgets
        // at once.
        vec![
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Fail,
            },
            Op::Advance(Step::Backoff {
                addr: a,
                edge: Edge::At,
            }),
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Fail,
            },
            Op::Advance(Step::Decay {
                addr: a,
                edge: Edge::Before,
            }),
            Op::PruneAddresses,
            Op::Advance(Step::Decay {
                addr: a,
                edge: Edge::At,
            }),
            Op::Advance(Step::Decay {
                addr: a,
                edge: Edge::Before,
            }),
            Op::PruneAddresses,
            Op::Advance(Step::Millis(1)),
            Op::Get { addr: a },
            Op::PruneAddresses,
            Op::GetOrConnect {
                addr: a + 1,
                script: ConnectScript::Hang,
            },
            Op::MarkUp { addr: a + 1 },
            Op::GetOrConnect {
                addr: a + 1,
                script: ConnectScript::Ok,
            },
            Op::MarkUp { addr: a + 1 },
            Op::Remove { addr: a + 1 },
        ],
        // I17: close() cuts a connect that hangs or takes time; the caller gets Closed.
        vec![Op::CloseWhileConnecting {
            addr: a,
            script: ConnectScript::Hang,
        }],
        vec![
            Op::Insert { addr: a + 1 },
            Op::CloseWhileConnecting {
                addr: a,
                script: ConnectScript::Slow,
            },
            Op::Insert { addr: a },
            Op::GetOrConnect {
                addr: a,
                script: ConnectScript::Ok,
            },
            Op::PruneAddresses,
        ],
        vec![Op::CloseWhileConnecting {
            addr: a,
            script: ConnectScript::Ok,
        }],
    ];
    for ops in scenarios {
        let scenario = Scenario { knobs, ops };
        if let Err(violation) = run(&scenario) {
            panic!("{violation}\n{scenario:?}");
        }
    }
    // I1/I3 with LRU: making room is counted as such, and a replacement keeps its slot (I2).
    let knobs = Knobs {
        max: 1,
        lru: true,
        ..Knobs::default()
    };
    let ops = vec![
        Op::Insert { addr: 0 },
        Op::Insert { addr: 1 },
        Op::Insert { addr: 1 },
        Op::GetOrConnect {
            addr: 2,
            script: ConnectScript::Fail,
        },
        Op::GetOrConnect {
            addr: 3,
            script: ConnectScript::Ok,
        },
    ];
    let scenario = Scenario { knobs, ops };
    if let Err(violation) = run(&scenario) {
        panic!("{violation}\n{scenario:?}");
    }
}

/// Several shared connections per address (I23), hand-written so that every run covers them: an
/// address grows when its every connection is busy, hands out the least loaded (the oldest of
/// equals), stops at `max_per_address`, promotes the oldest when the first leaves, backs off
/// when a background connect is refused and grows again after, never by making room.
#[test]
fn i23_several_shared_connections_at_the_edges() {
    // max_per_address 3, busy_in_flight 1.
    let knobs = Knobs {
        per_address: 2,
        busy: 1,
        ..Knobs::default()
    };
    assert_eq!(
        keyed_pool_proptests::Settings::from(knobs)
            .pool_config()
            .busy_in_flight,
        1,
        "the busy knob reaches the pool"
    );
    let ok = ConnectScript::Ok;
    let scenarios = [
        // Growth to the limit, the least loaded handed out, the first removed (the oldest
        // promoted), a further one removed by id (I14), idle sweeps of each.
        vec![
            Op::GetOrConnect {
                addr: 0,
                script: ok,
            },
            Op::Begin { handle: 0 },
            Op::GetOrConnect {
                addr: 0,
                script: ok,
            },
            Op::Begin { handle: 1 },
            Op::GetOrConnect {
                addr: 0,
                script: ok,
            },
            Op::Begin { handle: 2 },
            Op::GetOrConnect {
                addr: 0,
                script: ok,
            },
            Op::Get { addr: 0 },
            Op::Finish {
                call: 1,
                how: ops::Finish::Success,
            },
            Op::Get { addr: 0 },
            Op::RemoveConnection { handle: 0 },
            Op::Get { addr: 0 },
            Op::Remove { addr: 0 },
            Op::Advance(Step::MaxIdle(Edge::After)),
            Op::EvictIdle,
            Op::Insert { addr: 0 },
            Op::Close,
        ],
        // A refused background connect backs the address off (I12): no growth until it ends.
        vec![
            Op::GetOrConnect {
                addr: 1,
                script: ok,
            },
            Op::Begin { handle: 0 },
            Op::Server { addr: 1, up: false },
            Op::GetOrConnect {
                addr: 1,
                script: ok,
            },
            Op::GetOrConnect {
                addr: 1,
                script: ok,
            },
            Op::Server { addr: 1, up: true },
            Op::Advance(Step::Backoff {
                addr: 1,
                edge: Edge::Before,
            }),
            Op::GetOrConnect {
                addr: 1,
                script: ok,
            },
            Op::Advance(Step::Millis(1)),
            Op::GetOrConnectTwice {
                addr: 1,
                script: ok,
            },
            Op::Get { addr: 1 },
            Op::Clear,
        ],
    ];
    for ops in scenarios {
        let scenario = Scenario { knobs, ops };
        match keyed_pool_proptests::run_counting_growths(&scenario) {
            Ok(growths) => assert!(growths >= 2, "I23: the scenario must grow: {scenario:?}"),
            Err(violation) => panic!("{violation}\n{scenario:?}"),
        }
    }
}

/// Found by `shared_connections_match_model`: the idle sweep skipped the further shared
/// connections of an address whose first connection had a pending `get` mark
/// (`idle_candidates` in `src/sweep.rs` `continue`s once `MarkFolds::take` keeps the entry), so
/// an idle one survived the sweep (I6, I23).
#[test]
fn i6_i23_the_idle_sweep_judges_every_shared_connection_when_the_first_was_just_used() {
    let knobs = Knobs {
        per_address: 1,
        busy: 1,
        ..Knobs::default()
    };
    let ops = vec![
        Op::GetOrConnect {
            addr: 0,
            script: ConnectScript::Ok,
        },
        Op::Begin { handle: 0 },
        // Every connection busy: a second one, handed out by the next get.
        Op::GetOrConnect {
            addr: 0,
            script: ConnectScript::Ok,
        },
        Op::Begin { handle: 1 },
        Op::Finish {
            call: 1,
            how: ops::Finish::Success,
        },
        Op::Finish {
            call: 0,
            how: ops::Finish::Success,
        },
        Op::Advance(Step::MaxIdle(Edge::After)),
        // The first gets a pending mark; the second stays idle past max_idle.
        Op::Get { addr: 0 },
        Op::EvictIdle,
    ];
    let scenario = Scenario { knobs, ops };
    if let Err(violation) = run(&scenario) {
        panic!("{violation}\n{scenario:?}");
    }
}

/// The numbers of issue 11's ejection, stated outright on a real pool (the model says the same, or
/// the properties above would fail): default policy without jitter.
#[test]
fn ejection_learns_decays_and_is_forgotten() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pool: Pool = ConnectionPool::builder()
            .backoff(Duration::from_secs(1), Duration::from_secs(120), 0.0)
            .connector(ScriptedConnector::new(Duration::ZERO))
            .build::<FakeConn>()
            .expect("valid");
        let a = addr(0);
        let s = Duration::from_secs;
        let backoff = |pool: &Pool| {
            pool.backoff_until(&a)
                .map(|t| t - tokio::time::Instant::now())
        };
        // Accept, then close at once: every connection dies young; the count never resets.
        for (k, delay) in [(1, 1_000), (2, 1_600), (3, 2_560)] {
            pool.connector().script(Some(ConnectScript::Ok));
            let conn = pool.get_or_connect(&a).await.expect("connects");
            conn.client()
                .transport_open
                .store(false, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(pool.evict_unhealthy().await, 1);
            assert_eq!(pool.ejection_count(&a), k, "I12 violated");
            assert_eq!(
                backoff(&pool),
                Some(Duration::from_millis(delay)),
                "I12 violated"
            );
            tokio::time::advance(Duration::from_millis(delay)).await;
        }
        // Quiet: one step off per 30 s, counted from the end of the backoff.
        tokio::time::advance(s(30) - Duration::from_millis(1)).await;
        assert_eq!(pool.ejection_count(&a), 3, "I12 violated");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(pool.ejection_count(&a), 2, "I12 violated");
        tokio::time::advance(s(60)).await;
        assert_eq!(pool.ejection_count(&a), 0, "I12 violated");
        assert_eq!(pool.tracked_addresses(), 1, "I18: settled, not yet pruned");
        assert_eq!(pool.prune_addresses().await, 1, "I18 violated");
        assert_eq!(pool.tracked_addresses(), 0, "I18 violated");
        // A failed connect backs off; mark_up ends it at once and forgets the address.
        pool.connector().script(Some(ConnectScript::Fail));
        assert!(matches!(
            pool.get_or_connect(&a).await,
            Err(PoolError::Connect { .. })
        ));
        assert!(matches!(
            pool.get_or_connect(&a).await,
            Err(PoolError::Backoff { failures: 1, .. })
        ));
        pool.mark_up(&a);
        assert_eq!(
            (pool.ejection_count(&a), pool.tracked_addresses()),
            (0, 0),
            "I12 violated: mark_up (and I18: the address leaves)"
        );
        pool.connector().script(Some(ConnectScript::Ok));
        assert!(pool.get_or_connect(&a).await.is_ok());
    });
}

/// CI fixes proptest's seed with `PROPTEST_RNG_SEED`; nothing here may override it.
#[test]
fn the_rng_seed_comes_from_the_environment() {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let want = seed.map_or(RngSeed::Random, RngSeed::Fixed);
    assert_eq!(cases(1).rng_seed, want);
    assert_eq!(cases(64).rng_seed, want);
}
