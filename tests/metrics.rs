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
