//! Health: I8 (never hand out a closed transport), I9 (unhealthy: never handed out again, then
//! evicted and closed), I10 (consecutive count = trailing run), I11 (no ratio verdict below the
//! minimum volume), and the backoff an unhealthy eviction starts (I12).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Conn, MS, SEC, Script, addr, advance};
use keyed_pool::ConnectionPool;
use keyed_pool::core::Verdict;

fn scripted(consecutive: u32, min_requests: u32) -> (ConnectionPool<Conn, Script>, Script) {
    let script = Script::default();
    let pool = ConnectionPool::builder()
        .max_idle(Duration::from_secs(600))
        .consecutive_failures(consecutive)
        .failure_ratio(0.5)
        .health_window(10 * SEC)
        .min_requests(min_requests)
        .connector(script.clone())
        .build()
        .unwrap();
    (pool, script)
}

#[tokio::test(start_paused = true)]
async fn i8_get_never_returns_a_connection_whose_transport_is_closed() {
    let (pool, script) = scripted(5, 20);
    let conn = Conn::new(1);
    let open = conn.open.clone();
    pool.insert(addr(0), conn);
    assert!(pool.get(addr(0)).is_some());
    open.store(false, Ordering::SeqCst); // the connector's is_open now says closed
    assert!(
        pool.get(addr(0)).is_none(),
        "I8 violated: closed transport handed out"
    );
    assert!(pool.get(addr(0)).is_none());
    assert_eq!(pool.stats().healthy, 0);
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(pool.stats().evictions.closed, 1);
    assert_eq!(script.closes(), 1, "the evicted connection must be closed");
    // It died younger than `short_lived`: a failure of its address (I12, accept-then-close).
    assert!(pool.backoff_until(addr(0)).is_some());
    assert_eq!(pool.ejection_count(addr(0)), 1);
}

#[tokio::test(start_paused = true)]
async fn i8_mark_closed_keeps_a_connection_from_get() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 0);
    pool.get(addr(0)).unwrap().mark_closed();
    assert!(
        pool.get(addr(0)).is_none(),
        "I8 violated: marked closed, still handed out"
    );
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert!(pool.is_empty());
}

#[tokio::test(start_paused = true)]
async fn i9_consecutive_failures_make_a_connection_unhealthy_and_evicted() {
    let (pool, script) = scripted(5, 1000);
    pool.insert(addr(0), Conn::new(1));
    let conn = pool.get(addr(0)).unwrap();
    for i in 1..5 {
        assert_eq!(conn.begin().failure(), Verdict::Healthy, "failure {i} of 5");
        assert!(
            pool.get(addr(0)).is_some(),
            "unhealthy too early, after {i} failures"
        );
    }
    assert!(
        conn.begin().failure().is_unhealthy(),
        "the 5th failure must trip it"
    );
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: unhealthy connection handed out"
    );
    // Latched: successes afterwards do not revive it.
    for _ in 0..50 {
        conn.begin().success();
    }
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: unhealthy verdict did not stick"
    );
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(pool.stats().evictions.unhealthy, 1);
    assert_eq!(
        script.closes(),
        1,
        "I9: the evicted connection must be closed"
    );
    assert!(conn.client().closed_by_pool.load(Ordering::SeqCst));
    assert!(
        pool.backoff_until(addr(0)).is_some(),
        "I12: an unhealthy eviction backs off"
    );
}

#[tokio::test(start_paused = true)]
async fn i9_failure_ratio_over_the_window_trips_with_enough_volume() {
    let (pool, _) = scripted(5, 20);
    pool.insert(addr(0), Conn::new(1));
    let conn = pool.get(addr(0)).unwrap();
    // Alternate: never more than one failure in a row, half of all calls fail.
    for i in 0..19 {
        if i % 2 == 0 {
            conn.begin().failure();
        } else {
            conn.begin().success();
        }
        advance(10 * MS).await;
    }
    assert!(
        pool.get(addr(0)).is_some(),
        "I11 violated: 19 calls < min volume 20"
    );
    conn.begin().success(); // 20 calls, 10 failures: ratio 0.5
    assert!(
        pool.get(addr(0)).is_some(),
        "a success never trips the detector"
    );
    assert!(
        conn.begin().failure().is_unhealthy(),
        "21 calls, 11 failures >= 0.5"
    );
    assert!(pool.get(addr(0)).is_none(), "I9 violated");
    assert_eq!(pool.evict_unhealthy().await, 1);
}

#[tokio::test(start_paused = true)]
async fn i9_old_failures_slide_out_of_the_window() {
    let (pool, _) = scripted(0, 4);
    pool.insert(addr(0), Conn::new(1));
    let conn = pool.get(addr(0)).unwrap();
    for _ in 0..3 {
        conn.begin().failure();
    }
    advance(11 * SEC).await; // the window is 10 s
    for _ in 0..3 {
        conn.begin().success();
    }
    assert_eq!(
        conn.metrics().window_counts(tokio::time::Instant::now()),
        (3, 0)
    );
    assert!(
        conn.begin().failure() == Verdict::Healthy,
        "1 of 4 in the window"
    );
    assert!(pool.get(addr(0)).is_some());
}

#[tokio::test(start_paused = true)]
async fn i10_consecutive_count_equals_the_trailing_run_of_failures() {
    let (pool, _) = scripted(0, 1_000_000);
    pool.insert(addr(0), Conn::new(1));
    let conn = pool.get(addr(0)).unwrap();
    let pattern = [false, false, true, false, false, false, true, true, false];
    let mut run = 0u32;
    for ok in pattern {
        if ok {
            conn.begin().success();
            run = 0;
        } else {
            conn.begin().failure();
            run += 1;
        }
        assert_eq!(conn.metrics().consecutive_errors(), run, "I10 violated");
    }
    // A cancelled call is neither: the run is unchanged.
    drop(conn.begin());
    assert_eq!(
        conn.metrics().consecutive_errors(),
        run,
        "I10 violated by a cancelled call"
    );
}

#[tokio::test(start_paused = true)]
async fn i11_ratio_never_fires_below_the_minimum_volume() {
    let (pool, _) = scripted(0, 20);
    pool.insert(addr(0), Conn::new(1));
    let conn = pool.get(addr(0)).unwrap();
    for i in 1..20 {
        assert_eq!(
            conn.begin().failure(),
            Verdict::Healthy,
            "I11 violated at {i} calls"
        );
    }
    assert!(
        conn.begin().failure().is_unhealthy(),
        "20 of 20 failed: must trip"
    );
}

#[tokio::test(start_paused = true)]
async fn pool_level_record_error_hits_only_the_current_connection() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, 60 * SEC);
    pool.insert(addr(0), 0);
    for _ in 0..5 {
        pool.record_error(addr(0));
    }
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 via the original record_error interface"
    );
    assert_eq!(pool.stats().healthy, 0);
}
