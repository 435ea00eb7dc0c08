//! Shared mode with several connections per address (issue 13, I23): `get` and `get_or_connect`
//! hand out the least-loaded usable connection of an address, and `get_or_connect` connects
//! another in the background when every one is busy, up to `max_per_address`, one connect at a
//! time (I4), never by making room. Judged from the scripted connector's books (connections made
//! and closed) on virtual time.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Conn, MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::{CallGuard, ConnId, ConnectionPool, PoolBuilder, PooledConnection, WhenFull};

type Pool = ConnectionPool<Conn, Script>;

fn builder(script: &Script, max: usize, per_address: usize) -> PoolBuilder<Script> {
    script
        .builder(max, per_address)
        .max_idle(Duration::from_secs(60))
}

fn pool(script: &Script, max: usize, per_address: usize) -> Pool {
    builder(script, max, per_address).build().unwrap()
}

/// A `get_or_connect` that starts a call on what it got: the load that asks for more connections.
async fn busy(pool: &Pool, i: usize) -> (PooledConnection<Conn>, CallGuard) {
    let conn = pool.get_or_connect(addr(i)).await.expect("a connection");
    let guard = conn.begin();
    (conn, guard)
}

/// Lets the background connects finish (each takes `Outcome::Ok(10 ms)` here).
async fn settle() {
    advance(50 * MS).await;
}

/// I23: with the default `max_per_address` of 1, however busy the connection, no second one is
/// made: today's behaviour.
#[tokio::test(start_paused = true)]
async fn i23_one_connection_per_address_by_default() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 1);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(busy(&pool, 0).await);
        settle().await;
    }
    assert_eq!(script.connects(), 1, "I23 violated: a second connect");
    assert_eq!(pool.len(), 1);
    let ids: HashSet<ConnId> = held.iter().map(|(c, _)| c.id()).collect();
    assert_eq!(ids.len(), 1, "every caller shares the one connection");
}

/// I23: every connection busy → one more is connected in the background, one at a time (I4),
/// up to `max_per_address` and never beyond; callers are spread over them, least loaded first.
#[tokio::test(start_paused = true)]
async fn i23_busy_connections_grow_to_max_per_address_one_connect_at_a_time() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 3);
    let mut held = vec![busy(&pool, 0).await];
    assert_eq!(script.connects(), 1);
    // The first connection is busy: the next caller gets it (nothing else yet) and asks for one
    // more; callers meanwhile share the connect in flight (I4).
    held.push(busy(&pool, 0).await);
    held.push(busy(&pool, 0).await);
    advance(MS).await; // the connect task starts
    assert_eq!(
        script.connects(),
        2,
        "I4 violated: not one connect in flight"
    );
    settle().await;
    assert_eq!(pool.len(), 2);
    // The new connection is idle: the next caller gets it, least loaded first.
    let (conn, guard) = busy(&pool, 0).await;
    assert_ne!(
        conn.id(),
        held[0].0.id(),
        "I23 violated: not the least loaded"
    );
    held.push((conn, guard));
    // Both busy now: a third.
    held.push(busy(&pool, 0).await);
    settle().await;
    assert_eq!(pool.len(), 3);
    for _ in 0..10 {
        held.push(busy(&pool, 0).await);
        settle().await;
    }
    assert_eq!(
        script.connects(),
        3,
        "I23 violated: more than max_per_address"
    );
    assert_eq!(pool.len(), 3);
    assert_eq!(script.open_now(), 3);
    // The load is spread: every connection carries calls, and they differ by at most one.
    let state = pool.address(addr(0)).unwrap();
    let loads: Vec<u64> = state
        .connection
        .iter()
        .chain(&state.more_connections)
        .map(|c| c.in_flight)
        .collect();
    assert_eq!(loads.len(), 3);
    assert_eq!(loads.iter().sum::<u64>(), held.len() as u64);
    let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
    assert!(hi - lo <= 1, "I23 violated: uneven load {loads:?}");
    drop(held);
    pool.close().await;
    assert_eq!(script.open_now(), 0, "I17 violated: a connection left open");
}

/// I23: a connection is busy only at `busy_in_flight` calls.
#[tokio::test(start_paused = true)]
async fn i23_busy_in_flight_sets_when_another_connects() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = builder(&script, 0, 4).busy_in_flight(3).build().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(busy(&pool, 0).await);
        settle().await;
    }
    // The third caller found two calls in flight: not busy yet.
    assert_eq!(
        script.connects(),
        1,
        "I23 violated: connected below the threshold"
    );
    held.push(busy(&pool, 0).await);
    settle().await;
    assert_eq!(script.connects(), 2, "I23 violated: busy but not grown");
}

/// I23, I1: growing never goes past the global cap and never closes another address's idle
/// connection to make room, whatever `when_full` says.
#[tokio::test(start_paused = true)]
async fn i23_growing_respects_the_global_cap_and_never_makes_room() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = builder(&script, 3, 4)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    pool.get_or_connect(addr(1)).await.unwrap(); // idle, another address
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(busy(&pool, 0).await);
        settle().await;
    }
    assert_eq!(pool.used_slots(), 3, "I1");
    assert_eq!(script.open_now(), 3, "I1 violated at the connector");
    assert!(
        pool.peek(addr(1)).is_some(),
        "I23 violated: growing evicted another address's connection"
    );
    assert_eq!(pool.address(addr(0)).unwrap().more_connections.len(), 1);
}

/// I23: `get` picks the least-loaded usable connection and skips one whose transport closed (I8).
#[tokio::test(start_paused = true)]
async fn i23_get_hands_out_the_least_loaded_usable_connection() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 2);
    let a = busy(&pool, 0).await;
    let b = busy(&pool, 0).await; // shares `a` while the second connects
    settle().await;
    let second = pool.get(addr(0)).unwrap();
    assert_ne!(second.id(), a.0.id(), "I23 violated: not the least loaded");
    let extra = (second.clone(), second.begin());
    extra
        .0
        .client()
        .open
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // `a`'s connection carries two calls, the other one; but the other is closed.
    let got = pool.get(addr(0)).unwrap();
    assert_eq!(
        got.id(),
        a.0.id(),
        "I8 violated: a closed connection handed out"
    );
    drop((a, b, extra));
}

/// I5–I8, I14: the further connections are swept one by one: an idle one goes while a busy one
/// stays; a closed one goes alone; removing the first keeps the others, and the address keeps
/// serving.
#[tokio::test(start_paused = true)]
async fn i6_i8_sweeps_evict_each_connection_on_its_own() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 3);
    // A carries two calls (the second asks for B), B two (the second asks for C), C none.
    let first = busy(&pool, 0).await;
    let mut others = vec![busy(&pool, 0).await];
    settle().await;
    others.push(busy(&pool, 0).await);
    others.push(busy(&pool, 0).await);
    settle().await;
    assert_eq!(pool.len(), 3);
    // C's transport closes: the health sweep takes it alone.
    let c = pool.get(addr(0)).unwrap();
    assert_eq!(
        c.metrics().in_flight(),
        0,
        "the least loaded is the new one"
    );
    c.client()
        .open
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(pool.evict_unhealthy().await, 1, "I8: only the closed one");
    assert_eq!(pool.len(), 2);
    assert_eq!(script.closes(), 1);
    // Every call ends; the first connection is used again, the second is left idle.
    drop(others);
    advance(Duration::from_secs(30)).await;
    let first_id = first.0.id();
    drop(first);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(conn.id(), first_id, "equals: the oldest first");
    conn.begin().success();
    advance(Duration::from_secs(31)).await;
    assert_eq!(pool.evict_idle().await, 1, "I6: the idle one only");
    assert_eq!(pool.len(), 1, "I5 violated: the used one evicted");
    assert_eq!(pool.peek(addr(0)).unwrap().id(), first_id);
    // Removing the first by hand keeps the address serving through a fresh connect.
    assert!(pool.remove_connection(&conn));
    assert_eq!(pool.len(), 0);
    assert_eq!(script.open_now(), 0);
    assert!(pool.get_or_connect(addr(0)).await.is_ok());
}

/// I14: removing a further connection removes that one only, and the first stays first.
#[tokio::test(start_paused = true)]
async fn i14_remove_connection_takes_only_that_connection() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 2);
    let a = busy(&pool, 0).await;
    settle().await;
    let _b = busy(&pool, 0).await;
    settle().await;
    let other = pool.get(addr(0)).unwrap();
    assert_ne!(other.id(), a.0.id());
    assert!(pool.remove_connection(&other));
    assert!(!pool.remove_connection(&other), "I14: removed twice");
    assert_eq!(pool.len(), 1);
    assert_eq!(pool.peek(addr(0)).unwrap().id(), a.0.id());
    assert_eq!(script.closes(), 1);
    let stats = pool.stats();
    assert_eq!((stats.total, stats.in_flight), (1, 2));
}

/// I12, I23: a background connect that fails backs the address off, but the callers keep the
/// connections it has; nothing is retried until the backoff ends.
#[tokio::test(start_paused = true)]
async fn i12_a_failed_extra_connect_backs_off_and_keeps_serving() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 3);
    let mut held = vec![busy(&pool, 0).await];
    script.set_default(Outcome::Fail(5 * MS));
    held.push(busy(&pool, 0).await);
    settle().await;
    assert_eq!(script.connects(), 2);
    assert!(pool.backoff_until(addr(0)).is_some(), "I12: no backoff");
    for _ in 0..5 {
        held.push(busy(&pool, 0).await);
    }
    assert_eq!(
        script.connects(),
        2,
        "I12 violated: connected while backing off"
    );
    assert_eq!(pool.len(), 1);
    held.clear();
    advance(SEC).await;
}

/// I17: `close` closes every connection of an address, the further ones too.
#[tokio::test(start_paused = true)]
async fn i17_close_closes_every_shared_connection() {
    let script = Script::always(Outcome::Ok(10 * MS));
    let pool = pool(&script, 0, 4);
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(busy(&pool, 0).await);
        settle().await;
    }
    assert_eq!(script.open_now(), 4);
    drop(held);
    pool.close().await;
    assert_eq!(script.open_now(), 0, "I17 violated");
    assert_eq!(pool.len(), 0);
}
