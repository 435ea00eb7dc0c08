//! Tests that kill mutants which survived every other test (issue 17, `scripts/mutants.sh pool`):
//! each asserts a behaviour the rest of the suite only exercised, at exact instants (paused time).

mod common;

use std::time::Duration;

use common::{Conn, MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::core::{UnhealthyReason, Verdict};
use keyed_pool::{CallError, CallOutcome, ConnectionPool, PoolError};

const MAX_IDLE: Duration = Duration::from_secs(10);

/// `PooledConnection::age` is the time since the connection was made, and `is_idle` is the idle
/// predicate at this instant: fresh within `max_idle`, idle past it, never with a call in flight
/// (I5, I6). Sleeps may overshoot by a hair under madsim, so the edges are ±1 ms here (exact in
/// `src/core/idle.rs`).
#[tokio::test(start_paused = true)]
async fn i5_i6_a_connection_knows_its_age_and_whether_it_is_idle() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
    pool.insert(addr(0), 7);
    let conn = pool.peek(addr(0)).expect("pooled");
    assert!(conn.age() < MS);
    advance(3 * SEC).await;
    let age = conn.age();
    assert!(3 * SEC <= age && age < 3 * SEC + MS, "age {age:?}");
    advance(MAX_IDLE - 3 * SEC - MS).await;
    assert!(!conn.is_idle(MAX_IDLE), "I5 violated: idle within max_idle");
    advance(2 * MS).await;
    assert!(
        conn.is_idle(MAX_IDLE),
        "I6 violated: not idle past max_idle"
    );
    assert!(
        !conn.is_idle(MAX_IDLE + SEC),
        "fresh against a longer max_idle"
    );
    let call = conn.begin();
    assert!(
        !conn.is_idle(MAX_IDLE),
        "I5 violated: idle with a call in flight"
    );
    call.success();
    assert!(
        !conn.is_idle(MAX_IDLE),
        "I5 violated: idle right after a call"
    );
    let age = conn.age();
    assert!(
        MAX_IDLE + MS <= age && age < MAX_IDLE + 2 * MS,
        "a call does not change the age: {age:?}"
    );
}

/// `len` and `is_empty` count live connections, not addresses that only remember a backoff.
#[tokio::test(start_paused = true)]
async fn len_and_is_empty_count_live_connections() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
    assert!(pool.is_empty());
    assert_eq!(pool.len(), 0);
    pool.insert(addr(0), 0);
    assert!(!pool.is_empty());
    assert_eq!(pool.len(), 1);
    pool.insert(addr(1), 1);
    assert_eq!(pool.len(), 2);
    assert!(pool.take_unclosed(addr(0)).is_some());
    assert_eq!(pool.len(), 1);
    assert!(!pool.is_empty());
    assert!(pool.take_unclosed(addr(1)).is_some());
    assert!(pool.is_empty());
    assert_eq!(pool.len(), 0);
}

fn calling_pool(script: &Script) -> ConnectionPool<Conn, Script> {
    ConnectionPool::builder()
        .max_idle(MAX_IDLE)
        .connector(script.clone())
        .build()
        .unwrap()
}

/// `CallError::is_timeout` is `true` for a timeout only (it was checked only on timeouts, and only
/// in doctests for the other variants).
#[tokio::test(start_paused = true)]
async fn i16_only_a_timeout_is_a_timeout() {
    let script = Script::default();
    script.then(Outcome::Fail(Duration::ZERO));
    let pool = calling_pool(&script);
    let refused = pool
        .call(addr(0), |_| async { Ok::<(), &str>(()) })
        .await
        .unwrap_err();
    assert!(matches!(refused, CallError::Pool(_)), "{refused:?}");
    assert!(!refused.is_timeout());
    let own = pool
        .call(addr(1), |_| async { Err::<(), _>("refused") })
        .await
        .unwrap_err();
    assert_eq!(own.call_error(), Some(&"refused"));
    assert!(!own.is_timeout());
    let late = pool
        .call(addr(1), |_| async {
            advance(SEC).await;
            Ok::<(), &str>(())
        })
        .timeout(10 * MS)
        .await
        .unwrap_err();
    assert!(late.is_timeout(), "{late:?}");
}

/// A call's `Debug` shows the timeout it will use (the default, none, or its own).
#[tokio::test(start_paused = true)]
async fn a_call_shows_its_timeout() {
    let pool = calling_pool(&Script::default());
    let call = |_| async { Ok::<(), &str>(()) };
    assert_eq!(
        format!("{:?}", pool.call(addr(0), call)),
        "Call { timeout: None, .. }"
    );
    assert_eq!(
        format!("{:?}", pool.call(addr(0), call).no_timeout()),
        "Call { timeout: Some(None), .. }"
    );
    assert_eq!(
        format!("{:?}", pool.call(addr(0), call).timeout(MS)),
        "Call { timeout: Some(Some(1ms)), .. }"
    );
}

/// Each connection's id is its own number, shown as `#n` (I14 names connections by it).
#[tokio::test(start_paused = true)]
async fn i14_connection_ids_are_distinct_numbers_shown_as_such() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, MAX_IDLE);
    pool.insert(addr(0), 0);
    pool.insert(addr(1), 1);
    let a = pool.peek(addr(0)).unwrap().id();
    let b = pool.peek(addr(1)).unwrap().id();
    assert_ne!(a.get(), b.get(), "I14: two connections, two ids");
    assert!(a.get() > 1 || b.get() > 1, "ids count up: {a} {b}");
    assert_eq!(a.to_string(), format!("#{}", a.get()));
    assert_eq!(b.to_string(), format!("#{}", b.get()));
    // A connection's Debug shows what identifies it and its state.
    let conn = pool.peek(addr(0)).unwrap();
    let _call = conn.begin();
    assert_eq!(
        format!("{conn:?}"),
        format!(
            "PooledConnection {{ addr: \"{}\", id: ConnId({}), in_flight: 1, healthy: true, .. }}",
            addr(0),
            a.get()
        )
    );
}

/// `finish` returns the connection's latched health verdict after a success or a `Neither`: the
/// reason it closed on (I9), but a transport only known closed is no health verdict.
#[tokio::test(start_paused = true)]
async fn i9_finish_returns_the_latched_reason_and_a_closed_transport_is_no_verdict() {
    let script = Script::default();
    let pool: ConnectionPool<Conn, Script> = ConnectionPool::builder()
        .max_idle(MAX_IDLE)
        .consecutive_failures(2)
        .min_requests(1000)
        .connector(script)
        .build()
        .unwrap();
    pool.insert(addr(0), Conn::new(0));
    let conn = pool.peek(addr(0)).unwrap();
    assert_eq!(conn.begin().finish(CallOutcome::Success), Verdict::Healthy);
    assert_eq!(conn.begin().finish(CallOutcome::Neither), Verdict::Healthy);
    conn.begin().failure();
    let tripped = conn.begin().failure();
    let reason = UnhealthyReason::ConsecutiveFailures { count: 2 };
    assert_eq!(tripped, Verdict::Unhealthy(reason));
    assert_eq!(
        conn.begin().finish(CallOutcome::Success),
        Verdict::Unhealthy(reason),
        "I9"
    );
    assert_eq!(
        conn.begin().finish(CallOutcome::Neither),
        Verdict::Unhealthy(reason),
        "I9"
    );

    pool.insert(addr(1), Conn::new(1));
    let closed = pool.peek(addr(1)).unwrap();
    closed.mark_closed();
    assert_eq!(
        closed.metrics().unusable_reason(),
        Some(UnhealthyReason::Closed)
    );
    assert_eq!(
        closed.begin().finish(CallOutcome::Success),
        Verdict::Healthy
    );
    assert_eq!(
        closed.begin().finish(CallOutcome::Neither),
        Verdict::Healthy
    );
}

/// A warm-up report hands its results over in order, and its Debug maps each address to the
/// connection's id or the error.
#[tokio::test(start_paused = true)]
async fn a_warm_up_report_hands_over_its_results_and_shows_them() {
    let script = Script::default();
    script.then(Outcome::Ok(Duration::ZERO));
    script.then(Outcome::Fail(Duration::ZERO));
    let pool = calling_pool(&script);
    let report = pool.warm_up([addr(0), addr(1)], 1).await;
    let id = report.results()[0].1.as_ref().unwrap().id();
    let shown = format!("{report:?}");
    assert!(
        shown.starts_with(&format!(
            "{{\"{}\": Ok(ConnId({})), \"{}\": Err(",
            addr(0),
            id.get(),
            addr(1)
        )),
        "{shown}"
    );
    assert!(!report.is_complete(), "one of two failed");
    assert_eq!(report.connected(), 1);
    let results = report.into_results();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].0, addr(0));
    assert_eq!(results[0].1.as_ref().unwrap().id(), id);
    assert_eq!(results[1].0, addr(1));
    assert!(results[1].1.is_err());
}

/// A pool's `Debug` shows its addresses, the slots in use against the cap, and whether it is
/// closed (it was only ever formatted, never read).
#[tokio::test(start_paused = true)]
async fn a_pool_shows_its_addresses_slots_and_state() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(3, MAX_IDLE);
    pool.insert(addr(0), 0);
    pool.insert(addr(1), 1);
    assert_eq!(
        format!("{pool:?}"),
        "ConnectionPool { addresses: 2, used_slots: 2, max_connections: 3, closed: false, .. }"
    );
}

/// The deprecated `remove` is `take_unclosed` under its old name: it hands the connection back
/// unclosed and frees its slot at once (I2).
#[tokio::test(start_paused = true)]
#[allow(deprecated)]
async fn i2_the_old_remove_hands_the_connection_back_and_frees_its_slot() {
    let script = Script::default();
    let pool: ConnectionPool<Conn, Script> = ConnectionPool::builder()
        .max_connections(1)
        .connector(script.clone())
        .build()
        .unwrap();
    pool.insert(addr(0), Conn::new(7));
    let conn = pool.remove(addr(0)).expect("it was pooled");
    assert_eq!(conn.client().serial, 7);
    assert_eq!(script.closes(), 0, "handed back unclosed");
    assert!(pool.is_empty());
    assert_eq!(pool.used_slots(), 0, "I2 violated: the slot stayed taken");
    assert!(pool.remove(addr(0)).is_none(), "nothing left to remove");
    assert!(pool.insert(addr(1), Conn::new(8)), "I2 violated: no room");
}

/// I16 with a connect timeout beyond the clock's range (`Instant + Duration::MAX` overflows): the
/// connect's deadline falls back to 30 years on, so a hung connect is still waited for after 29
/// years, holds its slot (I3), and times out after 30.
#[tokio::test(start_paused = true)]
async fn i16_a_connect_timeout_past_the_clock_waits_thirty_years() {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
    let pool: ConnectionPool<Conn, Script> = ConnectionPool::builder()
        .connect_timeout(Duration::MAX)
        .connector(Script::always(Outcome::Hang))
        .build()
        .unwrap();
    let caller = pool.clone();
    let waiting = tokio::spawn(async move { caller.get_or_connect(addr(0)).await });
    advance(29 * YEAR).await;
    assert!(
        !waiting.is_finished(),
        "I16: the wait ended long before its deadline"
    );
    assert_eq!(pool.used_slots(), 1, "I3: the connect holds its slot");
    advance(YEAR + SEC).await;
    let err = waiting.await.expect("no panic").unwrap_err();
    assert!(
        matches!(err, PoolError::ConnectTimeout { .. }),
        "I16 violated: {err:?}"
    );
    assert_eq!(
        pool.used_slots(),
        0,
        "I3 violated: the slot was not given back"
    );
}

/// `clear` removes and closes every pooled connection (manual evictions) and frees their slots; a
/// connect in flight keeps its slot (I3) and a backing-off address keeps its backoff (I12). It was
/// called only where its effect was not checked.
#[tokio::test(start_paused = true)]
async fn clear_closes_every_connection_and_leaves_flights_and_backoffs() {
    let script = Script::default();
    script.then(Outcome::Fail(Duration::ZERO));
    script.then(Outcome::Hang);
    let pool: ConnectionPool<Conn, Script> = ConnectionPool::builder()
        .max_connections(8)
        .connector(script.clone())
        .build()
        .unwrap();
    assert!(pool.get_or_connect(addr(2)).await.is_err());
    let caller = pool.clone();
    let flight = tokio::spawn(async move { caller.get_or_connect(addr(3)).await });
    advance(MS).await;
    pool.insert(addr(0), Conn::new(100));
    pool.insert(addr(1), Conn::new(101));
    assert_eq!((pool.len(), pool.used_slots()), (2, 3));
    pool.clear();
    assert!(pool.is_empty(), "clear left a connection pooled");
    assert_eq!(script.closes(), 2, "clear closes what it removes");
    assert_eq!(pool.stats().evictions.manual, 2);
    assert_eq!(
        pool.used_slots(),
        1,
        "I3: the connect in flight keeps its slot, the others are free"
    );
    assert!(
        pool.backoff_until(addr(2)).is_some(),
        "I12: clear leaves the backoff"
    );
    assert!(!flight.is_finished(), "clear leaves the connect in flight");
}
