//! Liveness between uses: probes by the cleanup task (`PoolConfig::probe_idle`), the check before
//! use of `get_or_connect` (`PoolConfig::check_idle_before_use`) and `ConnectionPool::probe`.
//! A probe is not a use (I5, I6 hold as without probing), counts as in flight (I5), ends by its
//! timeout (I16), and a failed one evicts its connection, backing the address off when the server
//! did not answer (I12). See `docs/DESIGN.md`, "Liveness between uses".

mod common;
#[path = "common/probing.rs"]
mod probing;

use std::time::Duration;

use common::{MS, SEC, Script, addr, advance};
use keyed_pool::core::UnhealthyReason;
use keyed_pool::{ConfigError, ConnectionPool, PoolError};
use probing::{Probe, Probing, assert_took};
use tokio::time::Instant;

type Pool = ConnectionPool<common::Conn, Probing>;

fn pool_with(
    f: impl FnOnce(keyed_pool::PoolBuilder<Probing>) -> keyed_pool::PoolBuilder<Probing>,
) -> (Pool, Probing) {
    let connector = Probing::new(Script::default());
    let builder = ConnectionPool::builder()
        .max_idle(60 * SEC)
        .probe_timeout(500 * MS)
        .connector(connector.clone());
    (f(builder).build().unwrap(), connector)
}

/// The probes of the cleanup task find a server that died between uses before any caller does:
/// the connection is evicted as unhealthy and closed, and the address backs off (I12), so the next
/// caller gets the backoff at once instead of a call that hangs.
#[tokio::test(start_paused = true)]
async fn i12_a_dead_server_is_found_by_the_probe_before_any_caller_and_backs_off() {
    let (pool, connector) = pool_with(|b| b.probe_idle(5 * SEC));
    let _task = pool.start_cleanup_task(SEC);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    let serial = conn.client().serial;
    drop(conn);
    connector.set_probe(serial, Probe::Silent);

    // Quiet 5 s, then the next round (each second) probes it; the probe times out after 500 ms.
    advance(7 * SEC).await;
    assert!(
        pool.peek(addr(0)).is_none(),
        "the dead connection is still pooled after probe_idle + interval + probe timeout"
    );
    let stats = pool.stats();
    assert_eq!(stats.evictions.unhealthy, 1, "evicted as unhealthy");
    assert_eq!(
        connector.closes(),
        1,
        "I1: the evicted connection was closed"
    );
    assert_eq!(pool.ejection_count(addr(0)), 1, "I12 violated: no ejection");
    assert!(
        pool.backoff_until(addr(0)).is_some(),
        "I12 violated: no backoff"
    );
    match pool.get_or_connect(addr(0)).await {
        Err(PoolError::Backoff { cause, .. }) => {
            assert_eq!(cause.to_string(), UnhealthyReason::ProbeFailed.to_string());
        }
        other => panic!("I12 violated: expected the backoff, got {other:?}"),
    }
    assert_eq!(
        connector.connects(),
        1,
        "I12 violated: redialled while backing off"
    );
}

/// A probe is not a use: a healthy connection nobody uses answers every probe and is still
/// evicted as idle once `max_idle` has passed since its last use (I5, I6).
#[tokio::test(start_paused = true)]
async fn i5_i6_a_healthy_idle_connection_survives_probing_but_is_evicted_at_max_idle() {
    let (pool, connector) = pool_with(|b| b.max_idle(10 * SEC).probe_idle(2 * SEC));
    let _task = pool.start_cleanup_task(SEC);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    let last_used = conn.metrics().last_used();
    drop(conn);

    advance(9 * SEC).await;
    let metrics = pool
        .get_metrics(addr(0))
        .expect("I5 violated: evicted before max_idle");
    assert!(
        connector.probes() >= 2,
        "probed every 3 s or so: {}",
        connector.probes()
    );
    assert_eq!(
        metrics.success_count(),
        connector.probes(),
        "each probe is recorded as a call"
    );
    assert_eq!(
        metrics.last_used(),
        last_used,
        "I6 violated: a probe moved the idle clock"
    );
    assert!(metrics.last_probed().is_some());
    let stats = pool.stats();
    assert_eq!(
        (stats.total_requests, stats.latency_sum),
        (0, Duration::ZERO),
        "a probe is not a request: the pool's call totals count only calls users made"
    );
    assert_eq!(
        metrics.latency().count(),
        0,
        "nor is it in the latency histogram"
    );

    // Idle at 10 s after its last use; the next round (by 11 s) evicts it (I6).
    advance(2 * SEC + MS).await;
    assert!(
        pool.peek(addr(0)).is_none(),
        "I6 violated: probing kept an idle connection"
    );
    let stats = pool.stats();
    assert_eq!(stats.evictions.idle, 1);
    assert_eq!(stats.evictions.unhealthy, 0);
    assert_eq!(pool.ejection_count(addr(0)), 0);
}

/// A probe counts as a call in flight: an idle sweep never evicts a connection under its probe
/// (I5), and does once the probe has ended.
#[tokio::test(start_paused = true)]
async fn i5_a_connection_is_not_evicted_as_idle_mid_probe() {
    let (pool, connector) =
        pool_with(|b| b.max_idle(3 * SEC).probe_idle(SEC).probe_timeout(10 * SEC));
    connector.set_probe_delay(5 * SEC);
    drop(pool.get_or_connect(addr(0)).await.unwrap());
    advance(2 * SEC).await;
    let round = tokio::spawn({
        let pool = pool.clone();
        async move { pool.probe_idle().await }
    });
    advance(2 * SEC).await; // 4 s quiet: idle by max_idle, but the probe runs until 7 s
    assert_eq!(
        pool.get_metrics(addr(0)).unwrap().in_flight(),
        1,
        "the probe is in flight"
    );
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: evicted as idle mid-probe"
    );
    let round = round.await.unwrap();
    assert_eq!((round.probed, round.failed), (1, 0));
    assert_eq!(pool.get_metrics(addr(0)).unwrap().in_flight(), 0);
    assert_eq!(
        pool.evict_idle().await,
        1,
        "I6 violated: still idle after the probe, not evicted"
    );
}

/// A probe that never answers ends at the probe timeout (I16) and counts as a failure: decisive,
/// the connection is judged unhealthy with the probe as its reason (I9) and evicted.
#[tokio::test(start_paused = true)]
async fn i16_a_probe_that_hangs_ends_at_its_timeout_and_counts_as_a_failure() {
    let (pool, connector) = pool_with(|b| b.probe_idle(SEC).probe_timeout(750 * MS));
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe(conn.client().serial, Probe::Silent);
    advance(2 * SEC).await;
    let started = Instant::now();
    let round = pool.probe_idle().await;
    assert_took(
        started,
        750 * MS,
        "I16 violated: the probe outlived its timeout",
    );
    assert_eq!((round.probed, round.failed, round.evicted), (1, 1, 1));
    let metrics = conn.metrics();
    assert_eq!(
        metrics.total_errors(),
        1,
        "the timed-out probe is recorded as a failure"
    );
    assert_eq!(metrics.in_flight(), 0);
    assert_eq!(
        metrics.unusable_reason(),
        Some(UnhealthyReason::ProbeFailed),
        "I9"
    );
    assert!(pool.peek(addr(0)).is_none());
    assert_eq!(pool.ejection_count(addr(0)), 1, "I12");
}

/// A probing round runs at most `probe_concurrency` probes at once, as the connector sees them.
#[tokio::test(start_paused = true)]
async fn a_probing_round_never_exceeds_its_concurrency_bound() {
    let (pool, connector) = pool_with(|b| b.probe_idle(SEC).probe_concurrency(4));
    let addrs: Vec<_> = (0..40).map(addr).collect();
    assert!(pool.warm_up(&addrs, 8).await.is_complete());
    connector.set_probe_delay(100 * MS);
    advance(2 * SEC).await;
    let started = Instant::now();
    let round = pool.probe_idle().await;
    assert_eq!(round.probed, 40);
    assert_eq!(connector.probes(), 40);
    assert_eq!(
        connector.most_probes_at_once(),
        4,
        "the bound is reached, never passed"
    );
    assert_took(
        started,
        10 * 100 * MS,
        "40 probes, 4 at a time, 100 ms each",
    );
    assert_eq!(
        pool.probe_idle().await.probed,
        0,
        "each answered: none due again yet"
    );
}

/// A connection probed and found closed (the peer reset it) is evicted as closed: an old
/// connection's end is churn, not a failure of its address, so no backoff (I12's `short_lived`).
#[tokio::test(start_paused = true)]
async fn i12_a_probe_that_finds_the_transport_closed_evicts_it_as_closed_without_backoff() {
    let (pool, connector) = pool_with(|b| b.probe_idle(SEC));
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe(conn.client().serial, Probe::Reset);
    advance(10 * SEC).await; // older than `short_lived` (5 s)
    let round = pool.probe_idle().await;
    assert_eq!((round.failed, round.evicted), (1, 1));
    assert!(
        conn.metrics().is_closed(),
        "the probe marks the transport closed"
    );
    assert_eq!(pool.stats().evictions.closed, 1);
    assert_eq!(
        pool.ejection_count(addr(0)),
        0,
        "I12: an old connection closing is churn"
    );
}

/// Check before use: a connection that died while quiet is probed, evicted, and replaced by a
/// fresh connect, all inside the caller's `get_or_connect`: the caller never sees it (I8).
#[tokio::test(start_paused = true)]
async fn i8_check_before_use_replaces_a_dead_connection_transparently() {
    let (pool, connector) = pool_with(|b| b.check_idle_before_use(SEC));
    let first = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe(first.client().serial, Probe::Reset);
    advance(10 * SEC).await;
    let second = pool
        .get_or_connect(addr(0))
        .await
        .expect("a fresh connection");
    assert_ne!(
        second.id(),
        first.id(),
        "I8 violated: the dead connection was handed out"
    );
    assert!(second.is_healthy());
    assert_eq!(connector.connects(), 2);
    assert_eq!(connector.closes(), 1, "the dead connection was closed");
    assert_eq!(pool.ejection_count(addr(0)), 0);
}

/// Check before use against a server that does not answer: the probe ends at its timeout (I16),
/// the connection is evicted as unhealthy and the caller gets the backoff it started (I12).
#[tokio::test(start_paused = true)]
async fn i12_check_before_use_with_a_silent_server_gives_the_backoff() {
    let (pool, connector) = pool_with(|b| b.check_idle_before_use(SEC));
    let first = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe(first.client().serial, Probe::Silent);
    advance(10 * SEC).await;
    let started = Instant::now();
    let err = pool.get_or_connect(addr(0)).await.unwrap_err();
    assert!(
        matches!(err, PoolError::Backoff { .. }),
        "I12 violated: {err:?}"
    );
    assert_took(started, 500 * MS, "I16: bounded by the probe timeout");
    assert_eq!(
        connector.connects(),
        1,
        "I12 violated: dialled while backing off"
    );
}

/// Within the threshold, a hit is not probed; past it, one probe, and the probe clock spaces the
/// next.
#[tokio::test(start_paused = true)]
async fn check_before_use_probes_only_past_its_threshold() {
    let (pool, connector) = pool_with(|b| b.check_idle_before_use(5 * SEC));
    pool.get_or_connect(addr(0)).await.unwrap();
    advance(4 * SEC).await;
    pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(connector.probes(), 0, "used 4 s ago: handed out unprobed");
    advance(6 * SEC).await;
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(connector.probes(), 1);
    assert_eq!(conn.metrics().success_count(), 1, "the probe is recorded");
    pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(connector.probes(), 1, "used just now: not probed again");
}

/// A probe that answers hands out the connection it probed, the same one (I8 allows it); a
/// connection judged unhealthy while its probe ran is not handed out however the probe ends (I9):
/// it is evicted, and the caller meets the backoff its eviction started (I12).
#[tokio::test(start_paused = true)]
async fn i9_check_before_use_hands_out_the_probed_connection_only_if_still_usable() {
    let (pool, connector) = pool_with(|b| b.check_idle_before_use(SEC).consecutive_failures(1));
    let first = pool.get_or_connect(addr(0)).await.unwrap();
    advance(2 * SEC).await;
    let again = pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(connector.probes(), 1);
    assert_eq!(
        again.id(),
        first.id(),
        "an answered probe hands out the probed connection"
    );

    advance(2 * SEC).await;
    connector.set_probe_delay(100 * MS);
    let checking = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get_or_connect(addr(0)).await.map(|c| c.id()) })
    };
    advance(50 * MS).await;
    assert_eq!(connector.probes(), 2, "the check's probe is running");
    // A call on the connection fails meanwhile: one failure is unhealthy here.
    assert!(first.begin().failure().is_unhealthy());
    advance(100 * MS).await;
    match checking.await.unwrap() {
        Err(PoolError::Backoff { .. }) => {}
        Ok(id) if id == first.id() => {
            panic!("I9 violated: a connection judged unhealthy mid-probe was handed out")
        }
        other => panic!("I12: expected the backoff of the eviction, got {other:?}"),
    }
    assert!(
        pool.peek(addr(0)).is_none(),
        "I9: the unhealthy connection was evicted"
    );
}

/// A probe whose connection was marked closed while it ran fails as closed, even if the
/// connector's probe itself answered (I8).
#[tokio::test(start_paused = true)]
async fn i8_a_probe_of_a_connection_marked_closed_fails_as_closed() {
    let (pool, _connector) = pool_with(|b| b);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    conn.mark_closed();
    let err = pool
        .probe(&conn)
        .await
        .expect_err("I8 violated: a closed connection answered");
    assert!(
        matches!(&err, PoolError::Connect { cause, .. } if cause.to_string().contains("closed")),
        "{err}"
    );
}

/// Cancel safety: a caller dropped mid-probe leaves the connection pooled, with no call in
/// flight, nothing recorded, and its probe clock where it was.
#[tokio::test(start_paused = true)]
async fn a_check_before_use_dropped_mid_probe_leaks_nothing() {
    let (pool, connector) = pool_with(|b| b.check_idle_before_use(SEC).probe_timeout(10 * SEC));
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe_delay(5 * SEC);
    advance(2 * SEC).await;
    let cut = tokio::time::timeout(SEC, pool.get_or_connect(addr(0))).await;
    assert!(cut.is_err(), "dropped mid-probe");
    assert_eq!(connector.probes(), 1);
    let metrics = conn.metrics();
    assert_eq!(
        metrics.in_flight(),
        0,
        "I5: a dropped probe left a call in flight"
    );
    assert_eq!(
        metrics.request_count(),
        0,
        "a dropped probe records nothing"
    );
    assert_eq!(metrics.last_probed(), None);
    assert_eq!(pool.peek(addr(0)).map(|c| c.id()), Some(conn.id()));
    assert_eq!(pool.used_slots(), 1, "I3: no slot leaked");
}

/// `close` stops a probing round at once (I17): it does not wait out a probe timeout.
#[tokio::test(start_paused = true)]
async fn i17_close_stops_a_probing_round_at_once() {
    let (pool, connector) = pool_with(|b| b.probe_idle(SEC).probe_timeout(60 * SEC));
    let task = pool.start_cleanup_task(SEC);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    connector.set_probe(conn.client().serial, Probe::Silent);
    advance(3 * SEC).await;
    assert_eq!(conn.metrics().in_flight(), 1, "a probe is under way");
    let started = Instant::now();
    pool.close().await;
    assert_took(
        started,
        Duration::ZERO,
        "I17 violated: close waited for the probe",
    );
    assert!(
        task.is_finished(),
        "I17 violated: the cleanup task still runs"
    );
    assert_eq!(conn.metrics().in_flight(), 0);
    assert_eq!(
        connector.closes(),
        1,
        "I17 violated: the connection was not closed"
    );
}

#[test]
fn probe_settings_are_validated() {
    let build = |f: fn(
        keyed_pool::PoolBuilder<keyed_pool::NoConnector>,
    ) -> keyed_pool::PoolBuilder<keyed_pool::NoConnector>| {
        f(ConnectionPool::builder().max_idle(60 * SEC))
            .build::<u32>()
            .err()
    };
    assert_eq!(
        build(|b| b.probe_idle(60 * SEC)),
        Some(ConfigError::ProbeIdleNotBelowMaxIdle {
            probe_idle: 60 * SEC,
            max_idle: 60 * SEC
        })
    );
    assert_eq!(
        build(|b| b.probe_idle(Duration::from_micros(10))),
        Some(ConfigError::ProbeIdleTooShort {
            setting: "probe_idle",
            value: Duration::from_micros(10)
        })
    );
    assert_eq!(
        build(|b| b.check_idle_before_use(Duration::ZERO)),
        Some(ConfigError::ProbeIdleTooShort {
            setting: "check_idle_before_use",
            value: Duration::ZERO
        })
    );
    assert_eq!(
        build(|b| b.probe_timeout(Duration::ZERO)),
        Some(ConfigError::ProbeTimeoutTooShort {
            timeout: Duration::ZERO
        })
    );
    assert_eq!(
        build(|b| b.probe_concurrency(0)),
        Some(ConfigError::ZeroProbeConcurrency)
    );
    assert_eq!(
        build(|b| b.probe_idle(59 * SEC).check_idle_before_use(SEC)),
        None
    );
}
