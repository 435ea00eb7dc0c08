//! I17: dropping or closing the pool ends the cleanup task and closes every connection it held.

mod common;

use std::time::Duration;

use common::{Conn, MS, SEC, Script, addr, advance};
use keyed_pool::{ConnectionPool, PoolError};

fn scripted() -> (ConnectionPool<Conn, Script>, Script) {
    let script = Script::default();
    let pool = ConnectionPool::builder()
        .max_idle(60 * SEC)
        .connector(script.clone())
        .build()
        .unwrap();
    (pool, script)
}

#[tokio::test(start_paused = true)]
async fn i17_cleanup_task_ends_when_the_last_pool_handle_is_dropped() {
    let (pool, script) = scripted();
    for i in 0..3 {
        pool.insert(addr(i), Conn::new(i as u64));
    }
    let clone = pool.clone();
    let task = pool.start_cleanup_task(SEC);
    drop(pool);
    advance(5 * SEC).await;
    assert!(
        !task.is_finished(),
        "a clone still holds the pool: the task must run on"
    );
    drop(clone);
    // The task ends promptly (its stop channel closes with the pool), without waiting a tick.
    tokio::time::timeout(MS, task)
        .await
        .expect("I17 violated: cleanup task outlived the pool")
        .unwrap();
    assert_eq!(
        script.closes(),
        3,
        "I17 violated: dropping the pool left connections open"
    );
}

#[tokio::test(start_paused = true)]
async fn i17_close_stops_the_task_closes_everything_and_refuses_new_work() {
    let (pool, script) = scripted();
    for i in 0..4 {
        pool.insert(addr(i), Conn::new(i as u64));
    }
    let task = pool.start_cleanup_task(SEC);
    pool.close().await;
    assert!(
        task.is_finished(),
        "I17 violated: close returned before the cleanup task ended"
    );
    assert_eq!(
        script.closes(),
        4,
        "I17 violated: close left connections open"
    );
    assert!(pool.is_empty());
    assert_eq!(pool.used_slots(), 0);
    assert!(pool.is_closed());
    assert!(
        !pool.insert(addr(9), Conn::new(9)),
        "a closed pool must refuse inserts"
    );
    assert!(matches!(
        pool.try_insert(addr(9), Conn::new(9)),
        Err(PoolError::Closed)
    ));
    assert!(matches!(
        pool.get_or_connect(&addr(9)).await,
        Err(PoolError::Closed)
    ));
    assert_eq!(script.connects(), 0);
    // A task started after close ends at once; close is idempotent.
    let late = pool.start_cleanup_task(SEC);
    tokio::time::timeout(MS, late).await.unwrap().unwrap();
    pool.close().await;
}

#[tokio::test(start_paused = true)]
async fn i17_shutdown_stops_and_awaits_every_task_and_keeps_connections() {
    let (pool, script) = scripted();
    pool.insert(addr(0), Conn::new(0));
    let a = pool.start_cleanup_task(SEC);
    let b = pool.start_cleanup_task(2 * SEC);
    pool.shutdown().await;
    assert!(
        a.is_finished() && b.is_finished(),
        "I17 violated: shutdown returned early"
    );
    assert_eq!(pool.len(), 1);
    assert_eq!(script.closes(), 0);
    // A new task may be started after a shutdown, and it does its job.
    let c = pool.start_cleanup_task(SEC);
    advance(62 * SEC).await;
    assert!(
        pool.is_empty(),
        "the restarted cleanup task must evict the idle connection"
    );
    pool.shutdown().await;
    assert!(c.is_finished());
}

#[tokio::test(start_paused = true)]
async fn i17_aborting_the_task_handle_does_not_hang_shutdown() {
    let (pool, _) = scripted();
    let task = pool.start_cleanup_task(SEC);
    task.abort();
    let _ = task.await;
    tokio::time::timeout(MS, pool.shutdown())
        .await
        .expect("I16/I17 violated: shutdown waited for an aborted task");
}

#[tokio::test(start_paused = true)]
async fn cleanup_task_evicts_unhealthy_connections_too() {
    let (pool, script) = scripted();
    pool.insert(addr(0), Conn::new(0));
    let conn = pool.get(addr(0)).unwrap();
    for _ in 0..5 {
        conn.begin().failure();
    }
    let _task = pool.start_cleanup_task(Duration::from_millis(500));
    advance(501 * MS).await;
    assert!(
        pool.is_empty(),
        "I9 violated: the cleanup task left an unhealthy connection"
    );
    assert_eq!(script.closes(), 1);
    pool.close().await;
}

#[tokio::test(start_paused = true)]
async fn zero_cleanup_interval_is_raised_not_a_panic() {
    let (pool, _) = scripted();
    let task = pool.start_cleanup_task(Duration::ZERO);
    advance(10 * MS).await;
    assert!(!task.is_finished());
    pool.close().await;
    assert!(task.is_finished());
}
