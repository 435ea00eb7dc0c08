//! get_or_connect: I3 (slots reserved, returned on failure or cancel), I4 (one connect per
//! address, shared result), I12 (backoff), I16 (bounded waits), cancel safety, close.

mod common;

use std::time::Duration;

use common::{Conn, MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::core::BackoffPolicy;
use keyed_pool::{ConnectionPool, PoolError, WhenFull};
use tokio::time::Instant;

const TIMEOUT: Duration = Duration::from_secs(2);

fn pool_with(script: &Script, max: usize) -> ConnectionPool<Conn, Script> {
    ConnectionPool::builder()
        .max_connections(max)
        .max_idle(60 * SEC)
        .connect_timeout(TIMEOUT)
        .backoff(SEC, 8 * SEC, 0.2)
        .connector(script.clone())
        .build()
        .unwrap()
}

fn storm(
    pool: &ConnectionPool<Conn, Script>,
    n: usize,
    a: usize,
) -> Vec<tokio::task::JoinHandle<Result<keyed_pool::PooledConnection<Conn>, PoolError>>> {
    (0..n)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get_or_connect(&addr(a)).await })
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn i4_thousand_concurrent_callers_on_a_cold_address_make_one_connect() {
    let script = Script::always(Outcome::Ok(50 * MS));
    let pool = pool_with(&script, 0);
    let mut ids = Vec::new();
    for t in storm(&pool, 1000, 0) {
        ids.push(t.await.unwrap().expect("connect succeeds").id());
    }
    assert_eq!(
        script.connects(),
        1,
        "I4 violated: more than one connect in flight"
    );
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "I4 violated: callers got different connections"
    );
    let s = pool.stats();
    assert_eq!(
        (
            s.connects.attempted,
            s.connects.succeeded,
            s.connects.shared
        ),
        (1, 1, 999)
    );
    assert_eq!((pool.len(), pool.used_slots()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn i4_concurrent_callers_share_the_error_too() {
    let script = Script::always(Outcome::Fail(50 * MS));
    let pool = pool_with(&script, 0);
    for t in storm(&pool, 1000, 0) {
        match t.await.unwrap() {
            Err(PoolError::Connect { cause, .. }) => {
                assert_eq!(
                    cause.to_string(),
                    "scripted connect failure #1",
                    "I4: one shared cause"
                )
            }
            other => panic!("I4 violated: expected the shared connect error, got {other:?}"),
        }
    }
    assert_eq!(script.connects(), 1, "I4 violated");
    assert_eq!(pool.stats().connects.failed, 1);
}

#[tokio::test(start_paused = true)]
async fn i3_a_failed_connect_returns_its_slot() {
    let script = Script::always(Outcome::Fail(10 * MS));
    let pool = pool_with(&script, 1);
    assert!(pool.get_or_connect(&addr(0)).await.is_err());
    assert_eq!(
        pool.used_slots(),
        0,
        "I3 violated: the failed connect kept its slot"
    );
    assert!(
        pool.insert(addr(1), Conn::new(7)),
        "the slot must be usable again"
    );
}

#[tokio::test(start_paused = true)]
async fn i3_a_reserved_slot_counts_against_the_cap_while_connecting() {
    let script = Script::always(Outcome::Hang);
    let pool = pool_with(&script, 2);
    let connecting = storm(&pool, 1, 0);
    advance(MS).await;
    assert_eq!(
        (pool.used_slots(), pool.len(), pool.stats().reserved),
        (1, 0, 1)
    );
    assert!(pool.insert(addr(1), Conn::new(1)));
    assert!(
        !pool.insert(addr(2), Conn::new(2)),
        "I3 violated: reserved + live > max"
    );
    assert!(matches!(
        pool.get_or_connect(&addr(3)).await,
        Err(PoolError::AtCapacity {
            max: 2,
            live: 1,
            connecting: 1
        })
    ));
    for t in connecting {
        assert!(matches!(
            t.await.unwrap(),
            Err(PoolError::ConnectTimeout { .. })
        ));
    }
    assert_eq!(
        pool.used_slots(),
        1,
        "I3 violated: the timed-out connect kept its slot"
    );
    assert_eq!(pool.stats().reserved, 0);
}

/// Cancel safety, deadpool-style: cut the caller's future at every interesting instant of a
/// connect's life (before it starts, while connecting, right at completion, after), then check
/// that no slot leaked, no flight dangles, and the next caller succeeds.
#[tokio::test(start_paused = true)]
async fn i3_dropping_callers_at_any_await_point_leaks_nothing() {
    for outcome in [Outcome::Ok(50 * MS), Outcome::Fail(50 * MS), Outcome::Hang] {
        for cut in [0, 1, 25, 49, 50, 51, 1999, 2000, 2001].map(Duration::from_millis) {
            let script = Script::always(outcome);
            let pool = pool_with(&script, 1);
            // A leader and a follower, both cut at `cut`.
            let a = addr(0);
            let leader = tokio::time::timeout(cut, pool.get_or_connect(&a));
            let follower = tokio::time::timeout(cut, pool.get_or_connect(&a));
            let _ = tokio::join!(leader, follower);
            advance(TIMEOUT + MS).await; // let any connect finish or time out
            let ctx = format!("outcome {outcome:?}, cut at {cut:?}");
            assert!(pool.used_slots() <= 1, "I3 violated ({ctx})");
            assert_eq!(
                pool.used_slots(),
                pool.len(),
                "I3 violated: a slot leaked ({ctx})"
            );
            assert_eq!(pool.stats().reserved, 0, "a flight dangles ({ctx})");
            assert_eq!(script.connects(), 1, "I4 violated: two connects ({ctx})");
            // The next caller succeeds (after the backoff, if the connect failed).
            script.set_default(Outcome::Ok(MS));
            advance(2 * SEC).await;
            let next = pool.get_or_connect(&addr(0)).await;
            assert!(
                next.is_ok(),
                "the next caller must succeed ({ctx}): {next:?}"
            );
            assert_eq!((pool.len(), pool.used_slots()), (1, 1), "{ctx}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn i16_every_wait_ends_by_its_deadline() {
    let script = Script::always(Outcome::Hang);
    let pool = pool_with(&script, 0);
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            (pool.get_or_connect(&addr(0)).await, start.elapsed())
        })
    };
    advance(500 * MS).await;
    let start = Instant::now();
    let (late, late_waited) = (pool.get_or_connect(&addr(0)).await, start.elapsed());
    let (early, early_waited) = first.await.unwrap();
    assert!(matches!(
        early,
        Err(PoolError::ConnectTimeout {
            timeout: TIMEOUT,
            ..
        })
    ));
    // The bound is the deadline up to the timer's resolution (1 ms); the joined caller's deadline is
    // the flight's, which started 500 ms before it joined.
    let bound = TIMEOUT + MS;
    assert!(
        early_waited <= bound,
        "I16 violated: waited {early_waited:?} > {bound:?}"
    );
    assert!(matches!(late, Err(PoolError::ConnectTimeout { .. })));
    let bound = TIMEOUT - 500 * MS + MS;
    assert!(
        late_waited <= bound,
        "I16 violated: a joined wait took {late_waited:?} > {bound:?}"
    );
    assert_eq!(pool.stats().connects.timed_out, 1);
    assert_eq!(script.connects(), 1);
}

/// I12 against the schedule: a permanently failing address polled every 50 ms for 2 minutes is
/// dialled no more often than its backoff allows, and never much later than it allows either.
#[tokio::test(start_paused = true)]
async fn i12_a_failing_address_is_dialled_no_more_often_than_its_backoff_allows() {
    let script = Script::always(Outcome::Fail(Duration::ZERO));
    let pool = pool_with(&script, 0);
    let policy = BackoffPolicy {
        base: SEC,
        max: 8 * SEC,
        jitter: 0.2,
        ..BackoffPolicy::default()
    };
    let poll = 50 * MS;
    let mut backoff_errors = 0;
    for _ in 0..(120_000 / 50) {
        match pool.get_or_connect(&addr(0)).await {
            Err(PoolError::Backoff {
                retry_after,
                failures,
                cause,
                ..
            }) => {
                backoff_errors += 1;
                assert!(retry_after > Duration::ZERO && failures >= 1);
                assert!(
                    cause.to_string().contains("scripted connect failure"),
                    "last cause kept"
                );
            }
            Err(PoolError::Connect { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
        advance(poll).await;
    }
    let times = script.connect_times();
    assert!(
        times.len() >= 5,
        "it must keep probing: {} connects",
        times.len()
    );
    for (k, gap) in times.windows(2).map(|w| w[1] - w[0]).enumerate() {
        let k = k as u32 + 1;
        let nominal = policy.delay(k, 0.5);
        let lowest = policy.delay(k, 0.0);
        let highest = policy.delay(k, 1.0) + poll;
        assert!(
            gap >= lowest,
            "I12 violated: connect {k}->{}: gap {gap:?} < {lowest:?}",
            k + 1
        );
        assert!(
            gap <= highest,
            "connect {k}: gap {gap:?} > {highest:?} (nominal {nominal:?})"
        );
    }
    assert_eq!(pool.stats().connects.backoff_rejections, backoff_errors);
    assert_eq!(pool.backoff_failures(addr(0)), times.len() as u32);
}

/// I12 as amended by the slot issue: after the backoff the first connect is a single probe, and its
/// success does not reset the ejection count (TCP accepting says little about the server); the
/// count decays, one step per quiet `decay_interval` (30 s by default).
#[tokio::test(start_paused = true)]
async fn i12_the_first_connect_after_the_delay_is_a_single_probe_and_success_does_not_reset() {
    let script = Script::default();
    script
        .then(Outcome::Fail(Duration::ZERO))
        .then(Outcome::Fail(Duration::ZERO));
    script.set_default(Outcome::Ok(10 * MS));
    let pool = pool_with(&script, 0);
    assert!(pool.get_or_connect(&addr(0)).await.is_err());
    advance(2 * SEC).await;
    assert!(pool.get_or_connect(&addr(0)).await.is_err());
    assert_eq!(pool.ejection_count(addr(0)), 2);
    advance(3 * SEC).await; // past 1.6 s · 1.2
    for t in storm(&pool, 100, 0) {
        assert!(t.await.unwrap().is_ok());
    }
    assert_eq!(
        script.connects(),
        3,
        "I12 violated: the probe after the delay was not single"
    );
    assert_eq!(
        pool.ejection_count(addr(0)),
        2,
        "I12 violated: a successful connect reset the ejection count"
    );
    assert_eq!(pool.backoff_until(addr(0)), None);
    // The backoff ended at most 1.6 s · 1.2 after the second failure (2 s in); quiet since then.
    advance(27 * SEC).await; // 32 s in: under 30 s quiet whatever the jitter drew
    assert_eq!(
        pool.ejection_count(addr(0)),
        2,
        "no decay before a whole quiet interval"
    );
    advance(30 * SEC).await;
    assert_eq!(
        pool.ejection_count(addr(0)),
        1,
        "I12: one step per quiet interval"
    );
    advance(30 * SEC).await;
    assert_eq!(pool.ejection_count(addr(0)), 0);
}

#[tokio::test(start_paused = true)]
async fn i12_an_unhealthy_connection_is_evicted_and_backed_off_before_redialling() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool_with(&script, 0);
    let conn = pool.get_or_connect(&addr(0)).await.unwrap();
    for _ in 0..5 {
        conn.begin().failure();
    }
    // Not yet swept: get_or_connect evicts it itself, and must not redial at once.
    assert!(matches!(
        pool.get_or_connect(&addr(0)).await,
        Err(PoolError::Backoff { .. })
    ));
    assert_eq!(
        script.connects(),
        1,
        "I12 violated: redialled an unhealthy address at once"
    );
    assert_eq!(pool.stats().evictions.unhealthy, 1);
    assert_eq!(script.closes(), 1);
    advance(2 * SEC).await;
    let fresh = pool.get_or_connect(&addr(0)).await.unwrap();
    assert_ne!(fresh.id(), conn.id());
    assert_eq!(
        fresh.metrics().total_errors(),
        0,
        "I13: a fresh connection starts clean"
    );
}

/// A connection that dies after a long life is not its address's failure: it is replaced at once.
#[tokio::test(start_paused = true)]
async fn a_long_lived_connection_that_closes_is_replaced_without_backoff() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool_with(&script, 0);
    let conn = pool.get_or_connect(&addr(0)).await.unwrap();
    advance(pool.config().ejection.short_lived).await;
    conn.mark_closed();
    let next = pool.get_or_connect(&addr(0)).await.unwrap();
    assert_ne!(
        next.id(),
        conn.id(),
        "I8 violated: a closed connection was handed out"
    );
    assert_eq!(script.connects(), 2);
    assert_eq!(pool.stats().evictions.closed, 1);
    assert_eq!(pool.ejection_count(addr(0)), 0);
}

/// Issue 11, defect 2: a server that accepts every connection and closes it at once (a load
/// balancer in front of a dead broker) was redialled with no backoff at all (425 connects in 1 s).
/// A connection that dies younger than `short_lived` is a failure of its address (I12), and the
/// count grows connection after connection.
#[tokio::test(start_paused = true)]
async fn i12_accept_then_close_backs_off_and_the_backoff_grows() {
    let script = Script::always(Outcome::OkButClosed(Duration::ZERO));
    let pool = pool_with(&script, 0);
    let start = tokio::time::Instant::now();
    for _ in 0..(60_000 / 50) {
        let _ = pool.get_or_connect(&addr(0)).await;
        advance(50 * MS).await;
    }
    let elapsed = start.elapsed();
    let times = script.connect_times();
    let policy = pool.config().backoff;
    // Each connection dies young; the k-th death backs off at least delay(k) at the lowest draw.
    for (k, gap) in times.windows(2).map(|w| w[1] - w[0]).enumerate() {
        let lowest = policy.delay(k as u32 + 1, 0.0);
        assert!(
            gap >= lowest,
            "I12 violated: accept-then-close redialled after {gap:?} < {lowest:?} (death {})",
            k + 1
        );
    }
    assert!(
        times.len() < 15,
        "I12 violated: {} connects in {elapsed:?} to a server that closes every connection",
        times.len()
    );
    // The last connection is evicted (and counted) only by the next call after the loop's last.
    let closed = pool.stats().evictions.closed;
    assert!(closed + 1 >= times.len() as u64);
    assert_eq!(
        u64::from(pool.ejection_count(addr(0))),
        closed,
        "I12 violated: each connection that died young is one ejection"
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_address_is_refused_without_a_connect_attempt() {
    let script = Script::default();
    let pool = pool_with(&script, 0);
    for bad in [
        "",
        "no-port",
        "host:",
        "host:0",
        "host:00",
        "127.0.0.1:00",
        "127.0.0.1:000",
        "[::1]:0000",
        "host:99999",
        ":80",
        "a b:1",
        "::1:80",
    ] {
        match pool.get_or_connect(bad).await {
            Err(PoolError::InvalidAddress { addr, reason }) => {
                assert_eq!(addr.as_str(), bad);
                assert!(!reason.is_empty());
            }
            other => panic!("{bad:?}: expected InvalidAddress, got {other:?}"),
        }
    }
    assert_eq!(script.connects(), 0);
    assert_eq!(pool.stats().connects.attempted, 0);
}

/// I17: `close` is a cut. A connect in flight is abandoned at once (its waiters get `Closed`, not a
/// stale error), and once `close` returns nothing is pooled, nothing is reserved, and nothing the
/// connector made is open.
#[tokio::test(start_paused = true)]
async fn i17_close_during_a_connect_abandons_it_and_its_waiters_get_closed() {
    let script = Script::always(Outcome::Ok(100 * MS));
    let pool = pool_with(&script, 0);
    let waiting = storm(&pool, 3, 0);
    advance(10 * MS).await;
    pool.close().await;
    assert_eq!(
        (pool.len(), pool.used_slots(), pool.tracked_addresses()),
        (0, 0, 0),
        "I17 violated: state left after close returned"
    );
    for t in waiting {
        assert!(matches!(t.await.unwrap(), Err(PoolError::Closed)));
    }
    assert_eq!(script.connects(), 1);
    assert_eq!(
        script.closes(),
        0,
        "the abandoned connect made nothing to close"
    );
    assert!(matches!(
        pool.get_or_connect(&addr(0)).await,
        Err(PoolError::Closed)
    ));
    assert!(matches!(
        pool.try_insert(addr(1), Conn::new(9)),
        Err(PoolError::Closed)
    ));
}

#[tokio::test(start_paused = true)]
async fn get_or_connect_when_full_rejects_or_evicts_by_policy() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool_with(&script, 1);
    pool.get_or_connect(&addr(0)).await.unwrap();
    assert!(matches!(
        pool.get_or_connect(&addr(1)).await,
        Err(PoolError::AtCapacity {
            max: 1,
            live: 1,
            connecting: 0
        })
    ));
    assert_eq!(pool.stats().rejected_capacity, 1);

    let lru: ConnectionPool<Conn, Script> = ConnectionPool::builder()
        .max_connections(1)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .connector(script.clone())
        .build()
        .unwrap();
    lru.get_or_connect(&addr(0)).await.unwrap();
    let b = lru.get_or_connect(&addr(1)).await.unwrap();
    assert_eq!(lru.len(), 1);
    assert_eq!(lru.peek(addr(1)).unwrap().id(), b.id());
    // With a call in flight on the only connection, there is no room to make.
    let call = b.begin();
    assert!(matches!(
        lru.get_or_connect(&addr(2)).await,
        Err(PoolError::AtCapacity { .. })
    ));
    call.success();
}

#[tokio::test(start_paused = true)]
async fn a_healthy_pooled_connection_is_returned_without_connecting() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool_with(&script, 0);
    pool.insert(addr(0), Conn::new(42));
    let conn = pool.get_or_connect(&addr(0)).await.unwrap();
    assert_eq!(conn.client().serial, 42);
    assert_eq!(script.connects(), 0);
}

/// A caller woken by a failed flight's result that calls again at once meets the backoff the
/// flight recorded; it never joins the finished flight and gets its stale error (I12).
#[cfg(not(madsim))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i12_a_caller_retrying_right_after_a_failure_meets_the_backoff_not_a_stale_flight() {
    for round in 0..1000 {
        let script = Script::always(Outcome::Fail(Duration::ZERO));
        // Real time here: a backoff of a minute cannot run out under a stalled CI machine.
        let pool: ConnectionPool<Conn, Script> = ConnectionPool::builder()
            .backoff(60 * SEC, 120 * SEC, 0.2)
            .connector(script.clone())
            .build()
            .unwrap();
        let waiters = storm(&pool, 4, round % 8);
        for w in waiters {
            // A waiter that started after the flight ended meets the backoff instead: both fine.
            let first = w.await.unwrap();
            assert!(
                matches!(
                    first,
                    Err(PoolError::Connect { .. } | PoolError::Backoff { .. })
                ),
                "{first:?}"
            );
            match pool.get_or_connect(&addr(round % 8)).await {
                Err(PoolError::Backoff { .. }) => {}
                other => {
                    panic!("round {round}: expected Backoff right after the failure, got {other:?}")
                }
            }
        }
        assert_eq!(
            script.connects(),
            1,
            "I12 violated: dialled again inside the backoff"
        );
    }
}

/// Found by the simulation (flapping-broker seed 5): when a shared connect completed, the first
/// waiter to run used the connection and found it closed, and the next waiter was still handed that
/// closed connection. A waiter now gets a connection only if it is usable when handed over (I8).
/// Here the connection is already closed when the connect returns, so every waiter meets the case.
#[tokio::test(start_paused = true)]
async fn i8_a_waiter_is_never_handed_a_connection_that_closed_while_it_waited() {
    let script = Script::always(Outcome::OkButClosed(50 * MS));
    let pool = pool_with(&script, 0);
    for w in storm(&pool, 10, 0) {
        match w.await.unwrap() {
            Err(PoolError::Connect { cause, .. }) => {
                assert!(
                    cause
                        .to_string()
                        .contains("closed before it could be handed out")
                )
            }
            other => panic!("I8 violated: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(script.connects(), 1, "I4");
    // The dead connection does not linger, and having died young it is its address's failure
    // (accept-then-close, I12): the next caller meets the backoff, then connects afresh.
    script.set_default(Outcome::Ok(MS));
    assert!(matches!(
        pool.get_or_connect(&addr(0)).await,
        Err(PoolError::Backoff { failures: 1, .. })
    ));
    assert_eq!(pool.stats().evictions.closed, 1);
    advance(2 * SEC).await;
    let fresh = pool.get_or_connect(&addr(0)).await.unwrap();
    assert!(fresh.is_healthy());
    assert_eq!(script.connects(), 2);
}

/// A pool outliving the runtime that ran its connect (a shared pool used from several runtimes, as
/// tests often do): the connect task is dropped mid-connect with its runtime. Its slot comes back
/// (I3) and no dead flight is left for the next caller to join.
#[cfg(not(madsim))]
#[test]
fn i3_a_connect_task_dropped_with_its_runtime_leaks_no_slot_and_no_flight() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    };
    let script = Script::always(Outcome::Hang);
    let pool = pool_with(&script, 1);
    let first = runtime();
    first.block_on(async {
        let attempt = tokio::time::timeout(10 * MS, pool.get_or_connect(&addr(0))).await;
        assert!(attempt.is_err(), "the connect hangs");
    });
    assert_eq!(
        pool.used_slots(),
        1,
        "the hung connect holds its reserved slot"
    );
    drop(first); // drops the connect task mid-connect
    assert_eq!(
        pool.used_slots(),
        0,
        "I3 violated: a dropped connect task leaked its slot"
    );
    assert_eq!(pool.stats().reserved, 0);
    script.set_default(Outcome::Ok(Duration::ZERO));
    runtime().block_on(async {
        let conn = pool.get_or_connect(&addr(0)).await;
        assert!(conn.is_ok(), "a dead flight was joined: {conn:?}");
    });
    assert_eq!(script.connects(), 2);
}
