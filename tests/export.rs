//! The `metrics` feature: `export_metrics` writes what `stats()` and `addresses()` say, rendered
//! here in Prometheus' text format and read back number by number; the per-address series are
//! capped and a departed address is zeroed; the cleanup task exports every round.
//!
//! Not under madsim: the Prometheus recorder calibrates its clock (`quanta`) by spinning until real
//! time passes, and madsim freezes the clock it reads, so building one never returns there. What
//! is exported is the pool's own `stats()` and `addresses()`, which the madsim runs of the other
//! tests check; the export is plain code with no timing of its own.
#![cfg(all(feature = "metrics", not(madsim)))]

mod common;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::{ConnectionPool, WhenFull};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// The value of the series `name{labels}` in a Prometheus text rendering (labels exactly as the
/// exporter writes them), or `None` if it is absent.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().expect("a number"))
    })
}

fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

fn export<C: Send + Sync + 'static, K: keyed_pool::ManagesConnections<C>>(
    recorder: &PrometheusRecorder,
    pool: &ConnectionPool<C, K>,
) {
    metrics::with_local_recorder(recorder, || pool.export_metrics());
}

/// Every pool-wide series equals the field of `stats()` it exports, after a history with every
/// kind of outcome: calls that succeeded, failed and were cancelled (some on connections evicted
/// since: the counters are cumulative), evictions for four reasons, connects that succeeded,
/// failed and were shared, a backoff rejection and a capacity rejection.
#[tokio::test(start_paused = true)]
async fn the_rendered_numbers_are_the_pools_stats() {
    let script = Script::default();
    script
        .then(Outcome::Ok(10 * MS))
        .then(Outcome::Fail(MS))
        .then(Outcome::Ok(MS));
    let pool = ConnectionPool::builder()
        .connector(script.clone())
        .name("exported")
        .max_connections(2)
        .max_idle(60 * SEC)
        .backoff(SEC, 60 * SEC, 0.0)
        .build()
        .unwrap();
    // Two callers share one connect.
    let (a, b) = tokio::join!(pool.get_or_connect(addr(0)), pool.get_or_connect(addr(0)));
    let conn = a.unwrap();
    assert_eq!(b.unwrap().id(), conn.id());
    for ms in [1, 2, 3] {
        conn.record_success(ms * MS);
    }
    for _ in 0..5 {
        conn.begin().failure();
    }
    drop(conn.begin());
    assert_eq!(pool.evict_unhealthy().await, 1, "I9: 5 failures");
    assert!(
        pool.get_or_connect(addr(1)).await.is_err(),
        "a failed connect"
    );
    assert!(
        pool.get_or_connect(addr(1)).await.is_err(),
        "I12: backing off"
    );
    pool.insert(addr(2), common::Conn::new(100));
    pool.insert(addr(2), common::Conn::new(101)); // replaced
    pool.insert(addr(3), common::Conn::new(102));
    assert!(!pool.insert(addr(4), common::Conn::new(103)), "full");
    let live = pool.get(addr(2)).unwrap();
    live.record_success(7 * MS);
    let call = live.begin(); // one call in flight
    let fresh = pool.get_or_connect(addr(0)).await; // after the unhealthy eviction: backing off
    assert!(fresh.is_err());

    let (recorder, handle) = recorder();
    metrics::with_local_recorder(&recorder, keyed_pool::describe_metrics);
    export(&recorder, &pool);
    let text = handle.render();
    let s = pool.stats();
    let p = r#"pool="exported""#;
    let get = |series: String| {
        value(&text, &series).unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
    };
    let n = |x: u64| x as f64;
    assert_eq!(
        (s.total_requests, s.total_errors, s.total_cancelled),
        (9, 5, 1)
    );
    assert_eq!(
        get(format!("keyed_pool_requests_total{{{p}}}")),
        n(s.total_requests)
    );
    assert_eq!(
        get(format!("keyed_pool_request_errors_total{{{p}}}")),
        n(s.total_errors)
    );
    assert_eq!(
        get(format!("keyed_pool_requests_cancelled_total{{{p}}}")),
        n(s.total_cancelled)
    );
    assert_eq!(
        get(format!(
            "keyed_pool_request_duration_microseconds_total{{{p}}}"
        )),
        s.latency_sum.as_micros() as f64
    );
    let e = s.evictions;
    for (reason, want) in [
        ("idle", e.idle),
        ("unhealthy", e.unhealthy),
        ("closed", e.closed),
        ("replaced", e.replaced),
        ("manual", e.manual),
        ("make_room", e.make_room),
    ] {
        assert_eq!(
            get(format!(
                r#"keyed_pool_evictions_total{{{p},reason="{reason}"}}"#
            )),
            n(want),
            "{reason}"
        );
    }
    assert_eq!((e.unhealthy, e.replaced), (1, 1));
    let c = s.connects;
    assert_eq!((c.succeeded, c.failed, c.shared), (1, 1, 1));
    for (outcome, want) in [
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("timed_out", c.timed_out),
    ] {
        assert_eq!(
            get(format!(
                r#"keyed_pool_connects_total{{{p},outcome="{outcome}"}}"#
            )),
            n(want)
        );
    }
    assert_eq!(
        get(format!("keyed_pool_connects_shared_total{{{p}}}")),
        n(c.shared)
    );
    assert_eq!(
        get(format!("keyed_pool_backoff_rejections_total{{{p}}}")),
        n(c.backoff_rejections)
    );
    assert_eq!(
        get(format!("keyed_pool_capacity_rejections_total{{{p}}}")),
        n(s.rejected_capacity)
    );
    assert_eq!(
        get(format!("keyed_pool_connections{{{p}}}")),
        s.total as f64
    );
    assert_eq!(
        get(format!("keyed_pool_connections_healthy{{{p}}}")),
        s.healthy as f64
    );
    assert_eq!(
        get(format!("keyed_pool_calls_in_flight{{{p}}}")),
        n(s.in_flight)
    );
    assert_eq!(get(format!("keyed_pool_max_connections{{{p}}}")), 2.0);
    assert_eq!(
        get(format!("keyed_pool_addresses{{{p}}}")),
        pool.tracked_addresses() as f64
    );

    // Per address: addr(2) is connected with one call in flight and one 7 ms success; addr(1)
    // backs off with no connection.
    let a2 = format!(r#"{p},addr="{}""#, addr(2));
    assert_eq!(get(format!("keyed_pool_address_connected{{{a2}}}")), 1.0);
    assert_eq!(
        get(format!("keyed_pool_address_calls_in_flight{{{a2}}}")),
        1.0
    );
    let p50 = get(format!(
        r#"keyed_pool_address_request_duration_seconds{{{a2},quantile="0.5"}}"#
    ));
    assert!(
        (p50 - 0.007).abs() / 0.007 <= keyed_pool::core::MAX_RELATIVE_ERROR,
        "{p50}"
    );
    let a1 = format!(r#"{p},addr="{}""#, addr(1));
    assert_eq!(get(format!("keyed_pool_address_connected{{{a1}}}")), 0.0);
    assert_eq!(get(format!("keyed_pool_address_ejections{{{a1}}}")), 1.0);
    let left = pool.backoff_until(addr(1)).unwrap() - tokio::time::Instant::now();
    assert_eq!(
        get(format!("keyed_pool_address_backoff_seconds{{{a1}}}")),
        left.as_secs_f64()
    );
    assert!(
        text.contains("# HELP keyed_pool_requests_total"),
        "described"
    );
    call.success();
}

/// The `addr` label's cardinality is capped by `export_addresses`; an address that leaves the pool
/// has its gauges zeroed at the next export (not left showing "connected").
#[tokio::test(start_paused = true)]
async fn per_address_series_are_capped_and_a_departed_address_is_zeroed() {
    let pool = ConnectionPool::builder()
        .name("capped")
        .export_addresses(2)
        .when_full(WhenFull::Reject)
        .build::<u32>()
        .unwrap();
    for i in 0..5 {
        pool.insert(addr(i), i as u32);
    }
    let (recorder, handle) = recorder();
    export(&recorder, &pool);
    let text = handle.render();
    let connected: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("keyed_pool_address_connected{"))
        .collect();
    assert_eq!(connected.len(), 2, "capped at 2 addresses:\n{text}");
    assert_eq!(
        value(&text, r#"keyed_pool_addresses{pool="capped"}"#),
        Some(5.0)
    );

    let first = format!(
        r#"keyed_pool_address_connected{{pool="capped",addr="{}"}}"#,
        addr(0)
    );
    assert_eq!(value(&text, &first), Some(1.0));
    let conn = pool.peek(addr(0)).unwrap();
    assert!(pool.remove_connection(&conn));
    export(&recorder, &pool);
    let text = handle.render();
    assert_eq!(
        value(&text, &first),
        Some(0.0),
        "a departed address still shows connected"
    );
}

/// The cleanup task exports every round when the feature is on: a recorder installed globally sees
/// the pool's figures without anyone calling `export_metrics`. (The one test of this file that
/// installs a global recorder: once per process, as madsim runs a test once per seed in one
/// process; each run names its pool afresh.)
#[tokio::test(start_paused = true)]
async fn the_cleanup_task_exports_every_round() {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    static RUN: AtomicU64 = AtomicU64::new(0);
    let handle = HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("the only global recorder of this test binary")
    });
    let name = format!("cleaned-{}", RUN.fetch_add(1, Ordering::Relaxed));
    let pool = ConnectionPool::builder()
        .name(name.clone())
        .build::<u32>()
        .unwrap();
    let task = pool.start_cleanup_task(SEC);
    pool.insert(addr(0), 0);
    pool.get(addr(0)).unwrap().record_error();
    advance(SEC + MS).await;
    let series = format!(r#"keyed_pool_request_errors_total{{pool="{name}"}}"#);
    assert_eq!(value(&handle.render(), &series), Some(1.0));
    pool.get(addr(0)).unwrap().record_error();
    advance(SEC).await;
    assert_eq!(
        value(&handle.render(), &series),
        Some(2.0),
        "exported again a round later"
    );
    pool.close().await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
