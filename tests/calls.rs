//! Calls that record their own outcome (`ConnectionPool::call`, `PooledConnection::call`): every
//! outcome checked against the connection's metrics and against health eviction (I9–I12), the
//! call timeout (I16) and cancellation (nothing recorded as success or failure, nothing leaked).
//! The log of a guard dropped unfinished (the silent case of issue 14) is in `tests/guard_log.rs`.

mod common;

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Conn, MS, SEC, Script, addr, advance};
use keyed_pool::{CallError, CallOutcome, ConnectionPool, PoolError};
use tokio::time::Instant;

/// What a scripted server call can fail with: only `Io` says the server is in trouble.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum AppError {
    #[error("not found")]
    NotFound,
    #[error("i/o error")]
    Io,
}

fn is_io(e: &AppError) -> bool {
    *e == AppError::Io
}

/// A pool that judges a connection unhealthy after `consecutive` failures in a row (the ratio
/// detector out of reach) and backs off for at least 10 s after an ejection.
fn pool(consecutive: u32) -> (ConnectionPool<Conn, Script>, Script) {
    let script = Script::default();
    let pool = ConnectionPool::builder()
        .max_idle(Duration::from_secs(600))
        .consecutive_failures(consecutive)
        .min_requests(1000)
        .backoff(10 * SEC, 60 * SEC, 0.0)
        .connector(script.clone())
        .build()
        .unwrap();
    (pool, script)
}

/// A call that takes `took` and then returns `result`.
async fn answer<T>(took: Duration, result: Result<T, AppError>) -> Result<T, AppError> {
    advance(took).await;
    result
}

#[tokio::test(start_paused = true)]
async fn a_successful_call_records_its_latency() {
    let (pool, script) = pool(3);
    let value = pool
        .call(addr(0), |conn| async move {
            assert_eq!(
                conn.metrics().in_flight(),
                1,
                "I5: in flight during the call"
            );
            answer(30 * MS, Ok(conn.client().serial)).await
        })
        .await
        .unwrap();
    assert_eq!(value, 1, "the call ran on the connection the pool made");
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.success_count(), m.total_errors(), m.cancelled_count()),
        (1, 0, 0)
    );
    assert_eq!(m.in_flight(), 0);
    assert_eq!(m.avg_latency(), 30 * MS);
    assert_eq!(script.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn i9_failing_calls_evict_the_connection_and_back_off_the_address() {
    let (pool, script) = pool(3);
    for i in 1..=3 {
        let err = pool
            .call(addr(0), |_| answer::<()>(MS, Err(AppError::Io)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::Call(AppError::Io)),
            "call {i}: {err:?}"
        );
    }
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!((m.success_count(), m.total_errors()), (0, 3));
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: 3 failures in a row and still handed out"
    );
    // The next call evicts it (closing it) and finds the address backing off (I12): no connect.
    let err = pool
        .call(addr(0), |_| answer::<()>(MS, Ok(())))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Backoff { failures: 1, .. })),
        "I12 violated: {err:?}"
    );
    assert_eq!(pool.stats().evictions.unhealthy, 1);
    assert_eq!(script.closes(), 1, "I9: the evicted connection is closed");
    assert_eq!(script.connects(), 1, "I12: no connect while backing off");
    assert_eq!(pool.ejection_count(addr(0)), 1);
}

#[tokio::test(start_paused = true)]
async fn i9_errors_classified_as_not_failures_leave_the_connection_healthy() {
    let (pool, script) = pool(3);
    for _ in 0..10 {
        let err = pool
            .call(addr(0), |_| answer::<()>(2 * MS, Err(AppError::NotFound)))
            .failure_if(is_io)
            .await
            .unwrap_err();
        assert_eq!(err.call_error(), Some(&AppError::NotFound));
    }
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.success_count(), m.total_errors()),
        (10, 0),
        "a \"not found\" is a success of the transport: the server answered"
    );
    assert_eq!(m.avg_latency(), 2 * MS);
    assert!(pool.get(addr(0)).is_some(), "still healthy, still pooled");
    assert_eq!(pool.ejection_count(addr(0)), 0);
    assert_eq!(script.connects(), 1);
    // The same classifier lets the errors that matter through.
    for _ in 0..3 {
        let _ = pool
            .call(addr(0), |_| answer::<()>(MS, Err(AppError::Io)))
            .failure_if(is_io)
            .await;
    }
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: 3 counted failures in a row"
    );
}

#[tokio::test(start_paused = true)]
async fn an_error_classified_as_neither_is_counted_as_cancelled() {
    let (pool, _) = pool(1);
    let err = pool
        .call(addr(0), |_| answer::<()>(MS, Err(AppError::Io)))
        .classify(|_| CallOutcome::Neither)
        .await
        .unwrap_err();
    assert_eq!(err.into_call_error(), Some(AppError::Io));
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.success_count(), m.total_errors(), m.cancelled_count()),
        (0, 0, 1)
    );
    assert!(
        pool.get(addr(0)).is_some(),
        "a threshold of 1 failure, and none recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn i16_the_call_timeout_ends_the_call_and_counts_as_a_failure() {
    let script = Script::default();
    let pool = ConnectionPool::builder()
        .consecutive_failures(2)
        .call_timeout(100 * MS)
        .connector(script.clone())
        .build()
        .unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    // Connected first, so the clock below times the call alone.
    pool.get_or_connect(addr(0)).await.unwrap();
    let start = Instant::now();
    let err = pool
        .call(addr(0), |_| {
            let dropped = DropFlag(Arc::clone(&dropped));
            async move {
                let _dropped = dropped;
                answer::<()>(10 * SEC, Ok(())).await
            }
        })
        .await
        .unwrap_err();
    // Exactly 100 ms on tokio's paused clock; madsim's timers may fire a hair later.
    let took = Instant::now() - start;
    assert!(
        (100 * MS..=101 * MS).contains(&took),
        "I16 violated: the call ended after {took:?}"
    );
    assert!(
        matches!(&err, CallError::TimedOut { timeout, .. } if *timeout == 100 * MS),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("call to {} timed out after 100 ms", addr(0))
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the timed-out call's future was dropped"
    );
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.success_count(), m.total_errors(), m.in_flight()),
        (0, 1, 0)
    );

    // Per call: a longer bound lets a slow call finish; `no_timeout` lifts it.
    pool.call(addr(0), |_| answer(300 * MS, Ok(())))
        .timeout(SEC)
        .await
        .unwrap();
    pool.call(addr(0), |_| answer(20 * SEC, Ok(())))
        .no_timeout()
        .await
        .unwrap();
    assert_eq!(m.success_count(), 2);
    // A shorter one cuts a call the pool's bound would allow; two in a row trip the detector.
    for _ in 0..2 {
        let err = pool
            .call(addr(0), |_| answer(50 * MS, Ok(())))
            .timeout(10 * MS)
            .await
            .unwrap_err();
        assert!(err.is_timeout());
    }
    assert_eq!(m.total_errors(), 3);
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: timeouts are failures"
    );
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_cancelled_and_leaks_nothing() {
    let (pool, script) = pool(1);
    let dropped = Arc::new(AtomicBool::new(false));
    let call = pool.call(addr(0), |_| {
        let dropped = DropFlag(Arc::clone(&dropped));
        async move {
            let _dropped = dropped;
            answer::<()>(10 * SEC, Err(AppError::Io)).await
        }
    });
    // The caller gives up after 50 ms: the call's future is dropped mid-call.
    assert!(
        tokio::time::timeout(50 * MS, call.into_future())
            .await
            .is_err()
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the call's future was dropped"
    );
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.success_count(), m.total_errors(), m.cancelled_count()),
        (0, 0, 1),
        "cancelled: neither success nor failure"
    );
    assert_eq!(m.in_flight(), 0, "I5: no call left in flight");
    assert!(
        pool.get(addr(0)).is_some(),
        "a cancellation is not a failure"
    );
    assert_eq!(pool.used_slots(), 1);
    assert_eq!(script.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn i3_a_call_dropped_while_connecting_records_nothing_and_its_connect_completes() {
    let (pool, script) = pool(1);
    script.then(common::Outcome::Ok(SEC));
    let ran = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&ran);
    let call = pool.call(addr(0), move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
        answer(MS, Ok(()))
    });
    assert!(
        tokio::time::timeout(100 * MS, call.into_future())
            .await
            .is_err()
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the call never started");
    assert_eq!(pool.used_slots(), 1, "I3: the connect holds its slot");
    advance(SEC).await;
    let m = pool
        .get_metrics(addr(0))
        .expect("the connect pooled its connection");
    assert_eq!(
        (m.success_count(), m.total_errors(), m.cancelled_count()),
        (0, 0, 0)
    );
    assert_eq!(pool.used_slots(), 1);
    assert_eq!(script.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn i5_a_connection_in_a_call_is_not_evicted_as_idle() {
    let script = Script::default();
    let pool = ConnectionPool::builder()
        .max_idle(SEC)
        .connector(script.clone())
        .build()
        .unwrap();
    let sweeper = pool.clone();
    let (result, evicted) = tokio::join!(
        pool.call(addr(0), |_| answer(5 * SEC, Ok(()))),
        async move {
            advance(3 * SEC).await;
            sweeper.evict_idle().await
        }
    );
    result.unwrap();
    assert_eq!(
        evicted, 0,
        "I5 violated: evicted as idle in the middle of a call"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hand_filled_pool_calls_through_the_connection() {
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .consecutive_failures(2)
        .call_timeout(SEC)
        .build()
        .unwrap();
    let conn = pool.try_insert(addr(0), 7).unwrap();
    assert_eq!(conn.call_timeout(), Some(SEC), "the pool's default");
    let doubled = conn
        .call(|c| async move { answer(MS, Ok(*c.client() * 2)).await })
        .await
        .unwrap();
    assert_eq!(doubled, 14);
    let err = conn
        .call(|_| answer::<()>(2 * SEC, Ok(())))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "the pool's call timeout applies: {err:?}");
    let _ = conn.call(|_| answer::<()>(MS, Err(AppError::Io))).await;
    assert!(
        pool.get(addr(0)).is_none(),
        "I9 violated: a timeout and a failure in a row"
    );
    assert_eq!(
        (
            conn.metrics().success_count(),
            conn.metrics().total_errors()
        ),
        (1, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn a_closed_pool_refuses_the_call_before_running_it() {
    let (pool, _) = pool(3);
    pool.close().await;
    let err = pool
        .call(addr(0), |_| async { Ok::<_, AppError>(()) })
        .await
        .unwrap_err();
    assert!(
        matches!(err.pool_error(), Some(PoolError::Closed)),
        "{err:?}"
    );
}

/// The silent case, side by side: the guard written by hand with `?` between `begin` and
/// `success` records every failure as cancelled, and health eviction never sees them; the same
/// call through `pool.call` records them as failures and the connection is evicted (I9).
#[tokio::test(start_paused = true)]
async fn i9_the_call_api_records_what_a_hand_written_guard_loses() {
    async fn by_hand(pool: &ConnectionPool<Conn, Script>) -> Result<(), AppError> {
        let conn = pool
            .get_or_connect(addr(0))
            .await
            .map_err(|_| AppError::Io)?;
        let call = conn.begin();
        answer(MS, Err(AppError::Io)).await?; // the `?` drops the guard: cancelled
        call.success();
        Ok(())
    }
    let (pool, _) = pool(3);
    for _ in 0..10 {
        assert!(by_hand(&pool).await.is_err());
    }
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!((m.total_errors(), m.cancelled_count()), (0, 10));
    assert!(pool.get(addr(0)).is_some(), "health never saw a failure");

    for _ in 0..3 {
        let _ = pool
            .call(addr(0), |_| answer::<()>(MS, Err(AppError::Io)))
            .await;
    }
    assert_eq!(m.total_errors(), 3);
    assert!(pool.get(addr(0)).is_none(), "I9 violated");
}
