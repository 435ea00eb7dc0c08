//! Exclusive checkout (issue 13): `ConnectionPool::checkout`, judged from the scripted connector's
//! books (connections made, closed, connects in flight) and the pool's gauges, on virtual time.
//! I19 per-address cap, I20 no double checkout, I21 FIFO, I22 a cancelled waiter leaks nothing,
//! fairness across addresses under the global cap (I1), deadlines (I16), discards, close (I17).

mod common;
#[path = "common/probing.rs"]
mod probing;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use common::{Conn, MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::{
    CheckoutError, ConnectionPool, EvictionReason, PoolBuilder, PoolError, PoolStats, WhenFull,
};
use probing::{Probe, Probing, assert_took};
use tokio::time::Instant;

type Pool = ConnectionPool<Conn, Script>;

fn builder(script: &Script, max: usize, per_address: usize) -> PoolBuilder<Script> {
    script.builder(max, per_address).checkout_timeout(SEC)
}

fn pool(script: &Script, max: usize, per_address: usize) -> Pool {
    builder(script, max, per_address).build().unwrap()
}

/// Yields (and lets virtual time pass a millisecond at a time) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
        advance(Duration::from_micros(100)).await;
    }
    panic!("never happened: {what}");
}

/// The books balance once nothing is in flight: nobody in line, nothing checked out, and every
/// slot held by a connection open at the connector (I1, I3, I22).
#[track_caller]
fn assert_settled(pool: &Pool, script: &Script, what: &str) {
    let stats: PoolStats = pool.stats();
    assert_eq!(
        (stats.checked_out, stats.waiting, stats.reserved),
        (0, 0, 0),
        "I22 violated ({what}): something stayed counted: {stats:?}"
    );
    assert_eq!(
        pool.used_slots() as u64,
        script.open_now(),
        "I1/I22 violated ({what}): slots held vs connections open at the connector"
    );
    assert_eq!(stats.total as u64, script.open_now(), "{what}: {stats:?}");
}

/// A checkout of `addr(i)` on a task of its own: the id of the connection it got (or why not),
/// and how long it waited.
fn timed_checkout(
    pool: &Pool,
    i: usize,
) -> tokio::task::JoinHandle<(Result<keyed_pool::ConnId, CheckoutError>, Duration)> {
    let pool = pool.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let got = pool.checkout(addr(i)).await.map(|c| c.id());
        (got, started.elapsed())
    })
}

fn poll_times<F: Future>(mut fut: Pin<&mut F>, n: usize) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..n {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn a_returned_connection_is_reused_and_mut_access_works() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 1);
    let mut conn = pool.checkout(addr(0)).await.unwrap();
    let id = conn.id();
    assert_eq!(conn.serial, 1);
    conn.serial = 100; // `&mut` access: the caller holds it alone
    assert_eq!(pool.stats().checked_out, 1);
    drop(conn);
    let again = pool.checkout(addr(0)).await.unwrap();
    assert_eq!((again.id(), again.serial), (id, 100), "the same connection");
    assert_eq!(script.connects(), 1);
    drop(again);
    assert_settled(&pool, &script, "after reuse");
    assert_eq!(pool.stats().idle, 1);
}

#[tokio::test(start_paused = true)]
async fn i19_an_address_never_has_more_than_max_per_address_connections() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 2);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let conn = pool.checkout(addr(0)).await.unwrap();
                advance(5 * MS).await;
                drop(conn);
            })
        })
        .collect();
    for _ in 0..200 {
        let ex = pool
            .address(addr(0))
            .map(|a| a.exclusive)
            .unwrap_or_default();
        assert!(
            ex.idle + ex.checked_out + ex.connecting <= 2,
            "I19 violated: {ex:?}"
        );
        assert!(
            script.open_now() <= 2,
            "I19 violated: {} open",
            script.open_now()
        );
        advance(MS).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        script.connects(),
        2,
        "I19: two connections served five callers"
    );
    assert_settled(&pool, &script, "after the burst");
}

#[tokio::test(start_paused = true)]
async fn i20_no_connection_is_checked_out_to_two_callers() {
    let script = Script::always(Outcome::Ok(3 * MS));
    let pool = pool(&script, 0, 3);
    let held: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (pool, held) = (pool.clone(), Arc::clone(&held));
            tokio::spawn(async move {
                for round in 0..20 {
                    let conn = pool.checkout(addr(0)).await.unwrap();
                    let id = conn.id().get();
                    assert!(
                        held.lock().unwrap().insert(id),
                        "I20 violated: connection {id} handed to task {i} (round {round}) while held"
                    );
                    advance(Duration::from_micros(500 + 100 * i)).await;
                    held.lock().unwrap().remove(&id);
                    drop(conn);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        script.connects() <= 3,
        "I19 violated: {} connects",
        script.connects()
    );
    assert_settled(&pool, &script, "after the rounds");
}

#[tokio::test(start_paused = true)]
async fn i21_callers_are_served_in_arrival_order() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let first = pool.checkout(addr(0)).await.unwrap();
    let order: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (p, order) = (pool.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let conn = p.checkout(addr(0)).await.unwrap();
            order.lock().unwrap().push(i);
            advance(MS).await;
            drop(conn);
        }));
        // The next caller arrives only once this one is in line.
        until("the caller is in line", || pool.stats().waiting == i + 1).await;
    }
    drop(first);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        *order.lock().unwrap(),
        [0, 1, 2, 3, 4],
        "I21 violated: not served in arrival order"
    );
    assert_eq!(script.connects(), 1);
}

#[tokio::test(start_paused = true)]
async fn i21_a_late_caller_does_not_overtake_the_line_for_a_returned_connection() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let held = pool.checkout(addr(0)).await.unwrap();
    let id = held.id();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.map(|c| c.id()) })
    };
    until("in line", || pool.stats().waiting == 1).await;
    drop(held);
    // A caller arriving right after the return finds nothing idle: it went to the line.
    let late = pool.checkout(addr(0));
    tokio::pin!(late);
    assert!(
        poll_times(late.as_mut(), 1).is_none(),
        "I21 violated: the late caller took it"
    );
    assert_eq!(waiter.await.unwrap().unwrap(), id);
    assert_eq!(
        late.await.unwrap().id(),
        id,
        "then it is the late caller's turn"
    );
}

/// I22: a caller dropped at every await point of its checkout leaks nothing: its place in line,
/// a connection sent to it, a connect started for it, all go back (anchor: deadpool's
/// cancellation tests). Each step polls the future by hand once, then lets time move.
#[tokio::test(start_paused = true)]
async fn i22_a_waiter_dropped_at_any_point_leaks_nothing() {
    for polls in 0..8 {
        let script = Script::always(Outcome::Ok(3 * MS));
        let pool = pool(&script, 2, 1);
        // Another address holds the other slot, so the caller may also meet the global cap.
        let other = pool.checkout(addr(1)).await.unwrap();
        // Boxed, so that `drop` drops the future itself (a pinned local would live to the scope's
        // end).
        let mut fut = Box::pin(pool.checkout(addr(0)));
        let mut got = None;
        for _ in 0..polls {
            if let Some(out) = poll_times(fut.as_mut(), 1) {
                got = Some(out);
                break;
            }
            advance(MS).await;
        }
        let had = got.map(|r| r.expect("a connection").id());
        drop(fut);
        drop(other);
        // Let a connect started for it finish.
        advance(10 * MS).await;
        assert_settled(&pool, &script, &format!("dropped after {polls} polls"));
        // Whatever it left is usable at once, and nothing was made twice.
        let next = pool.checkout(addr(0)).await.unwrap();
        if let Some(id) = had {
            assert_eq!(next.id(), id, "I22 violated: its connection was not kept");
        }
        assert!(script.connects() <= 2 + u64::from(had.is_none()));
    }
}

#[tokio::test(start_paused = true)]
async fn i22_a_connection_sent_to_a_dropped_waiter_goes_to_the_next() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let held = pool.checkout(addr(0)).await.unwrap();
    let id = held.id();
    let mut first = Box::pin(pool.checkout(addr(0)));
    assert!(poll_times(first.as_mut(), 1).is_none(), "in line");
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.map(|c| c.id()) })
    };
    until("second in line", || pool.stats().waiting == 2).await;
    drop(held); // sent to `first`, which never looks at it again
    drop(first);
    assert_eq!(
        second.await.unwrap().unwrap(),
        id,
        "I22 violated: the connection handed to the dropped waiter was lost"
    );
    assert_eq!(script.connects(), 1);
    assert_settled(&pool, &script, "after the handover");
}

#[tokio::test(start_paused = true)]
async fn i16_a_wait_in_line_ends_at_its_deadline_saying_why() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let _held = pool.checkout(addr(0)).await.unwrap();
    let started = Instant::now();
    let err = pool.checkout(addr(0)).await.unwrap_err();
    assert_took(started, SEC, "I16 violated: the checkout timeout");
    assert!(
        matches!(&err, CheckoutError::TimedOut { checked_out: 1, timeout, .. } if *timeout == SEC),
        "{err:?}"
    );
    assert_eq!(pool.stats().waiting, 0, "I22: it left the line");
}

#[tokio::test(start_paused = true)]
async fn at_the_global_cap_an_idle_connection_of_another_address_is_closed_lru_first() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 2, 2);
    let a1 = pool.checkout(addr(0)).await.unwrap();
    let a2 = pool.checkout(addr(0)).await.unwrap();
    let lru = a1.id();
    drop(a1);
    advance(MS).await;
    drop(a2);
    let b = pool.checkout(addr(1)).await.unwrap();
    assert_eq!(pool.stats().evictions.make_room, 1);
    assert_eq!(script.open_now(), 2, "I1 violated");
    let a = pool.checkout(addr(0)).await.unwrap();
    assert_ne!(a.id(), lru, "the least recently used one was closed");
    drop((a, b));
    assert_settled(&pool, &script, "after making room");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_at_the_global_cap_gets_the_room_a_return_elsewhere_makes() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 2, 2);
    let a1 = pool.checkout(addr(0)).await.unwrap();
    let a2 = pool.checkout(addr(0)).await.unwrap();
    let b = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            pool.checkout(addr(1)).await.map(|_| started.elapsed())
        })
    };
    until("b in line", || pool.stats().waiting == 1).await;
    advance(100 * MS).await;
    assert_eq!(pool.stats().waiting, 1, "nothing idle to close yet");
    drop(a1); // idles at addr(0): b closes it for room
    let waited = b.await.unwrap().unwrap();
    assert!(
        waited < SEC,
        "no starvation while capacity exists elsewhere: {waited:?}"
    );
    assert_eq!(pool.stats().evictions.make_room, 1);
    assert!(script.open_now() <= 2, "I1 violated");
    drop(a2);
}

#[tokio::test(start_paused = true)]
async fn at_the_global_cap_with_nothing_idle_the_error_says_at_capacity() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 1, 1);
    let _a = pool.checkout(addr(0)).await.unwrap();
    let started = Instant::now();
    let err = pool.checkout(addr(1)).await.unwrap_err();
    assert_took(started, SEC, "I16 violated");
    assert!(
        matches!(err, CheckoutError::AtCapacity { max: 1, .. }),
        "{err:?}"
    );
    assert_eq!(pool.stats().rejected_capacity, 1);
}

/// A caller that waited on its address's own connect, slower than its deadline, was kept by that
/// connect, not by the cap: even though the connect holds the pool's last slot, the error says
/// `TimedOut`, and no capacity rejection is counted.
#[tokio::test(start_paused = true)]
async fn a_caller_behind_its_own_slow_connect_times_out_not_at_capacity() {
    let script = Script::always(Outcome::Ok(3 * SEC));
    let pool = builder(&script, 1, 2)
        .connect_timeout(10 * SEC)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = pool.checkout(addr(0)).await.unwrap_err();
    assert_took(started, SEC, "I16 violated");
    assert!(
        matches!(err, CheckoutError::TimedOut { .. }),
        "the caller waited on a connect in flight, not on room: {err:?}"
    );
    assert_eq!(pool.stats().rejected_capacity, 0);
}

#[tokio::test(start_paused = true)]
async fn a_shared_idle_connection_is_closed_for_room_only_under_evict_lru() {
    for (policy, room) in [
        (WhenFull::Reject, false),
        (WhenFull::EvictLeastRecentlyUsed, true),
    ] {
        let script = Script::always(Outcome::Ok(Duration::ZERO));
        let pool = builder(&script, 1, 1).when_full(policy).build().unwrap();
        pool.get_or_connect(addr(0)).await.unwrap();
        let got = pool.checkout(addr(1)).await;
        assert_eq!(got.is_ok(), room, "{policy:?}: {got:?}");
        assert!(script.open_now() <= 1, "I1 violated");
    }
}

#[tokio::test(start_paused = true)]
async fn no_waiter_starves_while_addresses_share_the_cap() {
    let script = Script::always(Outcome::Ok(MS));
    let pool = pool(&script, 3, 2);
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let conn = pool
                        .checkout(addr(i % 4))
                        .await
                        .unwrap_or_else(|e| panic!("caller {i} of address {} starved: {e}", i % 4));
                    advance(MS).await;
                    drop(conn);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(script.open_now() <= 3, "I1 violated");
    assert_settled(&pool, &script, "after the rounds");
}

#[tokio::test(start_paused = true)]
async fn a_failed_connect_fails_the_oldest_caller_only_and_backs_the_address_off() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    script.then(Outcome::Fail(10 * MS));
    let pool = builder(&script, 0, 1)
        .backoff(Duration::from_millis(100), Duration::from_secs(1), 0.0)
        .build()
        .unwrap();
    let first = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.map(|c| c.id()) })
    };
    until("first in line", || pool.stats().waiting == 1).await;
    let second = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            pool.checkout(addr(0)).await.map(|_| started.elapsed())
        })
    };
    let err = first.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, CheckoutError::Pool(PoolError::Connect { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("connect to 10.0.0.1:10911 failed"),
        "{err}"
    );
    // The second caller stayed in line and was served by the connect after the backoff (I12).
    let waited = second.await.unwrap().unwrap();
    assert!(waited >= 100 * MS && waited < SEC, "{waited:?}");
    assert_eq!(script.connects(), 2);
    assert_eq!(pool.ejection_count(addr(0)), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_meeting_a_backoff_with_nothing_to_wait_for_is_told_at_once() {
    let script = Script::always(Outcome::Fail(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    assert!(matches!(
        pool.checkout(addr(0)).await,
        Err(CheckoutError::Pool(PoolError::Connect { .. }))
    ));
    let started = Instant::now();
    let err = pool.checkout(addr(0)).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    let CheckoutError::Pool(PoolError::Backoff {
        failures, cause, ..
    }) = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*failures, 1);
    assert!(
        cause.to_string().contains("scripted connect failure"),
        "{cause}"
    );
    assert_eq!(
        script.connects(),
        1,
        "I12 violated: connected during the backoff"
    );
    assert_settled(&pool, &script, "after the backoff error");
}

#[tokio::test(start_paused = true)]
async fn a_hung_connect_fails_its_caller_with_the_connect_timeout() {
    let script = Script::always(Outcome::Hang);
    let pool = builder(&script, 0, 1)
        .connect_timeout(100 * MS)
        .build()
        .unwrap();
    let started = Instant::now();
    let err = pool.checkout(addr(0)).await.unwrap_err();
    assert_took(started, 100 * MS, "I16 violated");
    assert!(
        matches!(err, CheckoutError::Pool(PoolError::ConnectTimeout { .. })),
        "{err:?}"
    );
    assert_settled(&pool, &script, "after the timeout");
}

#[tokio::test(start_paused = true)]
async fn a_malformed_address_and_a_closed_pool_are_refused_at_once() {
    let script = Script::default();
    let pool = pool(&script, 0, 1);
    assert!(matches!(
        pool.checkout("no port").await,
        Err(CheckoutError::Pool(PoolError::InvalidAddress { .. }))
    ));
    pool.close().await;
    assert!(matches!(
        pool.checkout(addr(0)).await,
        Err(CheckoutError::Pool(PoolError::Closed))
    ));
    assert_eq!(script.connects(), 0);
}

#[tokio::test(start_paused = true)]
async fn broken_unhealthy_closed_and_old_connections_are_closed_on_return() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = builder(&script, 0, 1)
        .consecutive_failures(1)
        .max_lifetime(10 * SEC)
        .backoff(MS, 10 * MS, 0.0)
        .build()
        .unwrap();
    let evictions = |pool: &Pool| pool.stats().evictions;

    let mut conn = pool.checkout(addr(0)).await.unwrap();
    conn.mark_broken();
    drop(conn);
    assert_eq!((script.closes(), evictions(&pool).broken), (1, 1), "broken");
    assert_eq!(
        pool.ejection_count(addr(0)),
        0,
        "a broken connection is no failure of its address"
    );

    let conn = pool.checkout(addr(0)).await.unwrap();
    conn.begin().failure();
    drop(conn);
    assert_eq!(
        (script.closes(), evictions(&pool).unhealthy),
        (2, 1),
        "I9: unhealthy"
    );
    assert_eq!(
        pool.ejection_count(addr(0)),
        1,
        "I12: an unhealthy one backs off"
    );
    advance(20 * MS).await;

    let conn = pool.checkout(addr(0)).await.unwrap();
    conn.open.store(false, Ordering::SeqCst);
    drop(conn);
    assert_eq!(
        (script.closes(), evictions(&pool).closed),
        (3, 1),
        "I8: closed"
    );

    advance(SEC).await;
    let conn = pool.checkout(addr(0)).await.unwrap();
    advance(11 * SEC).await;
    drop(conn);
    assert_eq!(
        (script.closes(), evictions(&pool).lifetime),
        (4, 1),
        "past max_lifetime"
    );

    // An idle one past its lifetime is closed instead of handed out.
    let conn = pool.checkout(addr(0)).await.unwrap();
    let old = conn.id();
    drop(conn);
    advance(11 * SEC).await;
    assert_ne!(pool.checkout(addr(0)).await.unwrap().id(), old);
    assert_eq!((script.closes(), evictions(&pool).lifetime), (5, 2));
    assert_settled(&pool, &script, "after the discards");
}

#[tokio::test(start_paused = true)]
async fn i17_close_fails_the_line_and_closes_checked_out_connections_on_return() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let held = pool.checkout(addr(0)).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.map(|c| c.id()) })
    };
    until("in line", || pool.stats().waiting == 1).await;
    pool.close().await;
    assert!(matches!(
        waiter.await.unwrap(),
        Err(CheckoutError::Pool(PoolError::Closed))
    ));
    assert_eq!(
        script.open_now(),
        1,
        "the checked-out one stays open while used"
    );
    assert_eq!(held.serial, 1, "and usable");
    drop(held);
    assert_eq!(
        script.open_now(),
        0,
        "I17 violated: closed when it came back"
    );
    assert_eq!(pool.used_slots(), 0, "I17 violated: its slot was kept");
}

#[tokio::test(start_paused = true)]
async fn i17_close_waits_for_a_connect_in_flight_and_closes_what_it_made() {
    let script = Script::always(Outcome::Ok(SEC / 2));
    let pool = pool(&script, 0, 1);
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.map(|c| c.id()) })
    };
    until("connecting", || pool.stats().reserved == 1).await;
    pool.close().await;
    assert_eq!(
        pool.stats().reserved,
        0,
        "I17 violated: a connect in flight after close"
    );
    assert_eq!(script.open_now(), 0, "I17 violated");
    assert_eq!(pool.used_slots(), 0);
    assert!(matches!(
        waiter.await.unwrap(),
        Err(CheckoutError::Pool(PoolError::Closed))
    ));
}

#[tokio::test(start_paused = true)]
async fn i5_i6_the_idle_sweep_closes_idle_exclusive_connections_only() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = builder(&script, 0, 2).max_idle(10 * SEC).build().unwrap();
    let a = pool.checkout(addr(0)).await.unwrap();
    let b = pool.checkout(addr(0)).await.unwrap();
    drop(a);
    // Not to the nanosecond: madsim's clock moves a little on every poll.
    advance(10 * SEC - MS).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: returned within max_idle"
    );
    advance(2 * MS).await;
    assert_eq!(pool.evict_idle().await, 1, "I6 violated");
    assert_eq!(pool.stats().evictions.idle, 1);
    advance(20 * SEC).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: a checked-out one is never idle"
    );
    drop(b);
    assert_eq!(pool.stats().idle, 1);
    assert_eq!(pool.evict_idle().await, 0, "I5: just returned");
    assert_settled(&pool, &script, "after the sweeps");
}

#[tokio::test(start_paused = true)]
async fn i8_the_health_sweep_closes_an_idle_exclusive_connection_found_closed() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let conn = pool.checkout(addr(0)).await.unwrap();
    let open = Arc::clone(&conn.open);
    drop(conn);
    open.store(false, Ordering::SeqCst);
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(pool.stats().evictions.closed, 1);
    assert_settled(&pool, &script, "after the health sweep");
    assert!(pool.address(addr(0)).is_none_or(|a| a.exclusive.idle == 0));
}

#[tokio::test(start_paused = true)]
async fn a_quiet_connection_is_probed_before_hand_out_and_replaced_if_dead() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let probing = Probing::new(script.clone());
    let pool = ConnectionPool::builder()
        .connector(probing.clone())
        .max_per_address(1)
        .check_idle_before_use(10 * SEC)
        .build()
        .unwrap();
    drop(pool.checkout(addr(0)).await.unwrap());
    drop(pool.checkout(addr(0)).await.unwrap());
    assert_eq!(probing.probes(), 0, "used just now: not probed");
    advance(11 * SEC).await;
    let conn = pool.checkout(addr(0)).await.unwrap();
    assert_eq!(
        (probing.probes(), conn.serial),
        (1, 1),
        "probed, answered, handed out"
    );
    drop(conn);
    probing.set_probe(1, Probe::Reset);
    advance(11 * SEC).await;
    let conn = pool.checkout(addr(0)).await.unwrap();
    assert_eq!(conn.serial, 2, "the dead one was closed and a new one made");
    assert_eq!((probing.probes(), script.closes()), (2, 1));
    assert_eq!(pool.stats().evictions.closed, 1);
}

#[tokio::test(start_paused = true)]
async fn stats_and_addresses_count_exclusive_connections_and_the_line() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 2);
    let a = pool.checkout(addr(0)).await.unwrap();
    let b = pool.checkout(addr(0)).await.unwrap();
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(addr(0)).await.is_ok() })
    };
    until("in line", || pool.stats().waiting == 1).await;
    let stats = pool.stats();
    assert_eq!(
        (stats.total, stats.checked_out, stats.idle, stats.waiting),
        (2, 2, 0, 1)
    );
    let ex = pool.address(addr(0)).unwrap().exclusive;
    assert_eq!((ex.checked_out, ex.waiting), (2, 1));
    drop(a);
    assert!(waiter.await.unwrap());
    drop(b);
    let stats = pool.stats();
    assert_eq!((stats.total, stats.idle, stats.healthy), (2, 2, 2));
    assert_eq!(
        pool.stats().evictions.total(),
        0,
        "{:?}",
        EvictionReason::Manual
    );
}

/// Only the first caller in line makes room; the others are served as the line moves: each
/// connection idled elsewhere goes to the line that waits, one after the other.
#[tokio::test(start_paused = true)]
async fn every_caller_of_a_starved_line_is_served_as_room_appears() {
    let script = Script::always(Outcome::Ok(MS));
    let pool = pool(&script, 2, 2);
    let a1 = pool.checkout(addr(0)).await.unwrap();
    let a2 = pool.checkout(addr(0)).await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let pool = pool.clone();
            // The checkout is held (returned), so the two callers need two connections.
            tokio::spawn(async move { pool.checkout(addr(1)).await })
        })
        .collect();
    until("both in line", || pool.stats().waiting == 2).await;
    drop(a1);
    advance(10 * MS).await;
    drop(a2);
    let mut held = Vec::new();
    for w in waiters {
        held.push(w.await.unwrap().expect("served, not starved"));
    }
    assert_ne!(
        held[0].id(),
        held[1].id(),
        "I20 violated: two callers held one connection"
    );
    assert_eq!(pool.stats().evictions.make_room, 2);
    assert!(script.open_now() <= 2, "I1 violated");
}

/// I12 for exclusive connections: one returned fit from a checkout has served its holder, even if
/// the holder recorded no call, so the server closing it young afterwards (a keep-alive's end) is
/// no failure of the address; one whose transport is found closed when it comes back never served
/// (accept-then-close) and backs the address off.
#[tokio::test(start_paused = true)]
async fn i12_an_exclusive_connection_closed_after_serving_does_not_back_off() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = pool(&script, 0, 1);
    let conn = pool.checkout(addr(0)).await.unwrap();
    let open = Arc::clone(&conn.open);
    drop(conn); // returned fit: served
    advance(SEC).await;
    open.store(false, Ordering::SeqCst); // the server ends the keep-alive, 1 s into its life
    let next = pool.checkout(addr(0)).await;
    assert!(next.is_ok(), "I12 violated: {:?}", next.err());
    assert_eq!(
        pool.ejection_count(addr(0)),
        0,
        "I12 violated: a graceful close counted"
    );
    // This one is closed before it ever comes back fit: accept-then-close.
    let conn = next.unwrap();
    conn.open.store(false, Ordering::SeqCst);
    drop(conn);
    assert_eq!(
        pool.ejection_count(addr(0)),
        1,
        "I12 violated: a connection that never served died young unnoticed"
    );
    assert_eq!(script.closes(), 2);
}

/// Fairness under `WhenFull::EvictLeastRecentlyUsed` at the cap (issue 13, "no waiter starves
/// while capacity exists elsewhere"): a checkout waiting while the only other connection, a shared
/// one, has a call in flight is served as soon as that call ends (the connection may then be
/// closed to make room), not at its deadline. Before, nothing woke it: it got `AtCapacity` at its
/// deadline while a fresh caller made room at once (found by the model tier).
#[tokio::test(start_paused = true)]
async fn a_waiter_is_served_when_a_shared_connection_at_the_cap_goes_quiet() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let pool = builder(&script, 1, 1)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    let shared = pool.get_or_connect(addr(0)).await.unwrap();
    let call = shared.begin();
    let waiter = timed_checkout(&pool, 1);
    advance(100 * MS).await;
    assert!(!waiter.is_finished(), "the only slot is in use: it waits");
    call.success();
    drop(shared);
    advance(5 * MS).await;
    assert!(
        waiter.is_finished(),
        "starved: the waiter was not woken when the shared connection went quiet"
    );
    let (got, waited) = waiter.await.unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert!(
        waited < 200 * MS,
        "served at {waited:?}, not at the call's end"
    );
    assert_eq!(pool.stats().evictions.make_room, 1);
    assert_eq!(script.open_now(), 1, "I1 at the connector");
}

/// The same under the cap, for a shared connection just connected: while the caller that waited
/// for its connect has not yet taken it (its handoff), it may not be closed for room; once taken
/// it may, and the checkout waiting at the cap is woken then, not at its deadline.
#[tokio::test(start_paused = true)]
async fn a_waiter_is_served_when_a_shared_connections_handoff_ends_at_the_cap() {
    let script = Script::always(Outcome::Ok(100 * MS));
    let pool = builder(&script, 1, 1)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    let shared = tokio::spawn({
        let pool = pool.clone();
        async move { pool.get_or_connect(addr(0)).await.map(|c| c.id()) }
    });
    advance(10 * MS).await;
    let waiter = timed_checkout(&pool, 1);
    until("the checkout in line", || pool.stats().waiting == 1).await;
    let shared = shared.await.unwrap();
    assert!(shared.is_ok(), "{shared:?}");
    let (got, waited) = waiter.await.unwrap();
    assert!(got.is_ok(), "{got:?}");
    assert!(
        waited < 500 * MS,
        "starved: served at {waited:?}, not when the handoff ended"
    );
    assert_eq!(pool.stats().evictions.make_room, 1);
    assert_eq!(script.open_now(), 1, "I1 at the connector");
}

/// I16 with a check before use: a probe that fails sends the caller back in line, and the wait
/// that follows ends at the deadline of the checkout's start, not a full `checkout_timeout` after
/// the probe (the arrival reads the clock lazily; the deadline's start is fixed up front only
/// when probes may send the caller round again).
#[tokio::test(start_paused = true)]
async fn i16_a_failed_probe_counts_against_the_checkouts_one_deadline() {
    let script = Script::always(Outcome::Ok(Duration::ZERO));
    let probing = Probing::new(script.clone());
    let pool = ConnectionPool::builder()
        .connector(probing.clone())
        .max_per_address(2)
        .check_idle_before_use(10 * SEC)
        .probe_timeout(3 * SEC)
        .checkout_timeout(5 * SEC)
        .connect_timeout(100 * SEC)
        .build()
        .unwrap();
    let first = pool.checkout(addr(0)).await.unwrap();
    let held = pool.checkout(addr(0)).await.unwrap();
    let quiet = first.serial;
    drop(first);
    advance(11 * SEC).await;
    // The idle one hangs when probed; a new connect would outlast the wait.
    probing.set_probe(quiet, Probe::Silent);
    script.set_default(Outcome::Ok(100 * SEC));
    let start = Instant::now();
    let result = pool.checkout(addr(0)).await;
    let waited = start.elapsed();
    assert!(
        result.is_err(),
        "nothing could serve it: {:?}",
        result.map(|c| c.serial)
    );
    assert_eq!(probing.probes(), 1, "the quiet connection was probed");
    // Under madsim the clock moves a few nanoseconds on its own: a second of slack still tells
    // the checkout's deadline (5 s) from one started after the probe (8 s).
    assert!(
        (5 * SEC..6 * SEC).contains(&waited),
        "I16 violated: waited {waited:?}; the probe's 3 s did not count against the 5 s checkout timeout"
    );
    drop(held);
}
