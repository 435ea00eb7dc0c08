//! Per-connection metrics: I13 (results against a removed or replaced connection never reach
//! another), I14 (removal is conditional on the id), and the averages' denominators.

mod common;

use std::time::Duration;

use common::{MS, SEC, addr, advance};
use keyed_pool::ConnectionPool;

#[tokio::test(start_paused = true)]
async fn i13_results_on_a_replaced_connection_never_reach_its_successor() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 1);
    let old = pool.get(addr(0)).unwrap();
    let call = old.begin();
    pool.insert(addr(0), 2); // replaced while a call is in flight
    let new = pool.get(addr(0)).unwrap();
    assert_ne!(old.id(), new.id(), "every connection has its own id");
    call.failure();
    for _ in 0..10 {
        old.begin().failure();
        old.record_error();
    }
    let m = new.metrics();
    assert_eq!(
        (
            m.request_count(),
            m.total_errors(),
            m.consecutive_errors(),
            m.in_flight()
        ),
        (0, 0, 0, 0),
        "I13 violated: the successor inherited its predecessor's results"
    );
    assert!(
        pool.get(addr(0)).is_some(),
        "I13 violated: the successor was condemned"
    );
    assert_eq!(old.metrics().total_errors(), 21);
}

#[tokio::test(start_paused = true)]
async fn i13_results_on_a_removed_connection_never_reach_a_new_one() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 1);
    let old = pool.take_unclosed(addr(0)).unwrap();
    pool.insert(addr(0), 2);
    old.record_success(5 * MS);
    old.record_error();
    assert_eq!(
        pool.get_metrics(addr(0)).unwrap().request_count(),
        0,
        "I13 violated"
    );
}

#[tokio::test(start_paused = true)]
async fn i14_removing_one_id_never_removes_another() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 1);
    let first = pool.get(addr(0)).unwrap();
    pool.insert(addr(0), 2);
    assert!(
        !pool.remove_connection(&first),
        "I14 violated: (addr, id1) removed (addr, id2)"
    );
    assert_eq!(pool.get(addr(0)).map(|c| *c.client()), Some(2));
    let second = pool.get(addr(0)).unwrap();
    assert!(pool.remove_connection(&second));
    assert!(
        !pool.remove_connection(&second),
        "removing twice must not succeed twice"
    );
    assert!(pool.is_empty());
    assert_eq!(pool.used_slots(), 0);
}

#[tokio::test(start_paused = true)]
async fn latency_is_kept_in_microseconds_and_averaged_over_successes_only() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 0);
    let conn = pool.get(addr(0)).unwrap();
    let call = conn.begin();
    advance(2 * MS).await; // tokio's timer has millisecond resolution
    call.success();
    conn.record_success(Duration::from_micros(1_000));
    conn.begin().failure(); // an error has no latency
    drop(conn.begin()); // a cancelled call is neither
    let m = conn.metrics();
    assert_eq!(m.avg_latency(), Duration::from_micros(1_500));
    assert_eq!(m.max_latency(), Duration::from_micros(2_000));
    assert_eq!(
        (m.success_count(), m.total_errors(), m.cancelled_count()),
        (2, 1, 1)
    );
    assert_eq!(m.request_count(), 3);
    assert!((m.error_rate() - 1.0 / 3.0).abs() < 1e-9);
    let stats = pool.stats();
    assert_eq!((stats.total_requests, stats.total_errors), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn stats_count_live_healthy_idle_and_in_flight() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(4, 10 * SEC);
    for i in 0..3 {
        pool.insert(addr(i), i as u32);
    }
    advance(11 * SEC).await;
    let call = pool.get(addr(0)).unwrap().begin();
    pool.peek(addr(1)).unwrap().mark_closed(); // peek: no touch
    let s = pool.stats();
    assert_eq!((s.total, s.healthy, s.idle, s.in_flight), (3, 2, 2, 1));
    assert_eq!(s.max_connections, 4);
    assert!((s.utilization() - 0.75).abs() < 1e-9);
    assert_eq!(s.active(), 1);
    call.success();
}

/// Issue 14: 5 failures trip the health policy and the connection is evicted; the pool's error
/// count is cumulative and stays 5 (it used to sum the live connections and fall to 0).
#[tokio::test(start_paused = true)]
async fn cumulative_errors_survive_the_eviction_of_the_connection_that_made_them() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 1);
    let conn = pool.get(addr(0)).unwrap();
    conn.begin().success();
    for _ in 0..5 {
        conn.begin().failure();
    }
    drop(conn.begin()); // cancelled
    assert!(
        !conn.is_healthy(),
        "I9: 5 consecutive failures trip the policy"
    );
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert!(pool.is_empty());
    let s = pool.stats();
    assert_eq!(
        (
            s.total_requests,
            s.total_successes,
            s.total_errors,
            s.total_cancelled
        ),
        (6, 1, 5, 1),
        "cumulative counters went back after an eviction"
    );
    assert_eq!(s.evictions.unhealthy, 1);
}

/// Calls on connections that were replaced, removed, or evicted as idle, and calls recorded on a
/// handle after its connection left, all count; the latency sum is the sum of every success.
#[tokio::test(start_paused = true)]
async fn cumulative_counters_cover_every_connection_the_pool_ever_had() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 10 * SEC);
    pool.insert(addr(0), 1);
    let first = pool.get(addr(0)).unwrap();
    first.record_success(3 * MS);
    pool.insert(addr(0), 2); // replaces `first`
    first.record_error(); // recorded after it left: still a call the pool's connection made
    let second = pool.get(addr(0)).unwrap();
    second.record_success(5 * MS);
    let taken = pool.take_unclosed(addr(0)).unwrap();
    taken.record_error();
    pool.insert(addr(1), 3);
    pool.get(addr(1)).unwrap().record_success(7 * MS);
    advance(11 * SEC).await;
    assert_eq!(pool.evict_idle().await, 1);
    let s = pool.stats();
    assert_eq!(s.total, 0);
    assert_eq!((s.total_requests, s.total_errors), (5, 2));
    assert_eq!(s.latency_sum, 15 * MS);
    assert_eq!(s.avg_latency(), 5 * MS);
    assert!((s.error_rate() - 0.4).abs() < 1e-9);
}

/// Each connection keeps the distribution of its own successes' latencies (a replacement starts
/// empty, I13); failures and cancellations have no latency.
#[tokio::test(start_paused = true)]
async fn each_connection_keeps_its_latency_distribution() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 1);
    let conn = pool.get(addr(0)).unwrap();
    for ms in 1..=100 {
        conn.record_success(ms * MS);
    }
    conn.record_error();
    drop(conn.begin());
    let latency = conn.metrics().latency();
    assert_eq!(latency.count(), 100);
    assert_eq!(latency.sum(), 5050 * MS);
    for (q, exact) in [(0.5, 50.0), (0.9, 90.0), (0.99, 99.0)] {
        let got = latency.quantile(q).unwrap().as_secs_f64() * 1e3;
        assert!(
            (got - exact).abs() / exact <= keyed_pool::core::MAX_RELATIVE_ERROR,
            "p{q}: {got} ms, exact {exact} ms"
        );
    }
    pool.insert(addr(0), 2);
    assert_eq!(
        pool.get_metrics(addr(0)).unwrap().latency().count(),
        0,
        "I13 violated: a replacement inherited its predecessor's latencies"
    );
}

/// `addresses()` lists every address the pool keeps state for (I18), sorted: one with a
/// connection, one whose connect is in flight, one backing off with no connection (I12).
#[tokio::test(start_paused = true)]
async fn addresses_lists_connections_connects_in_flight_and_backoffs() {
    use common::{Outcome, Script};
    let script = Script::default();
    script
        .then(Outcome::Ok(MS))
        .then(Outcome::Fail(MS))
        .then(Outcome::Hang);
    let pool = ConnectionPool::builder()
        .connector(script.clone())
        .backoff(SEC, 60 * SEC, 0.0)
        .connect_timeout(10 * SEC)
        .build()
        .unwrap();
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    conn.record_success(2 * MS);
    conn.record_error();
    assert!(pool.get_or_connect(addr(1)).await.is_err());
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get_or_connect(addr(2)).await })
    };
    advance(5 * MS).await;
    let all = pool.addresses();
    let names: Vec<_> = all.iter().map(|s| s.addr.to_string()).collect();
    assert_eq!(
        names,
        [addr(0), addr(1), addr(2)].map(|a| a.to_string()),
        "I18: exactly the addresses with state, sorted"
    );
    let live = all[0]
        .connection
        .as_ref()
        .expect("addr 0 has its connection");
    assert_eq!(live.id, conn.id());
    assert!(live.healthy && !live.closed);
    assert_eq!(
        (live.requests, live.errors, live.consecutive_errors),
        (2, 1, 1)
    );
    assert_eq!(live.latency.count(), 1);
    // Made and last used at 1 ms; now is 1 ms (the failed connect) + 5 ms later (madsim adds
    // a few µs of its own per step).
    for (what, d) in [("age", live.age), ("idle time", live.idle_for)] {
        assert!((6 * MS..7 * MS).contains(&d), "{what} {d:?}, not 6 ms");
    }
    assert!(live.idle_for <= live.age);
    assert!(!all[0].connecting && all[0].backoff_until.is_none());

    let backing_off = &all[1];
    assert!(backing_off.connection.is_none() && !backing_off.connecting);
    assert_eq!(backing_off.ejection_count, 1, "I12: one failed connect");
    assert_eq!(backing_off.backoff_until, pool.backoff_until(addr(1)));
    assert!(backing_off.backoff_until.is_some());

    assert!(all[2].connecting && all[2].connection.is_none());
    assert_eq!(pool.address(addr(2)).unwrap(), all[2]);
    assert!(pool.address(addr(3)).is_none());
    waiting.abort();
}
