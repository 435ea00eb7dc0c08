//! `ConnectionPool::warm_up`: connects ahead of traffic through `get_or_connect`, at most
//! `concurrency` connects at once (as the connector's books see them), one result per distinct
//! address; capacity (I1, I3), one connect per address (I4), backoff (I12) and close (I17) hold
//! as for any caller.

mod common;
#[path = "common/probing.rs"]
mod probing;

use common::{MS, Outcome, SEC, Script, addr};
use keyed_pool::{ConnectionPool, PoolError};
use probing::{Probing, assert_took};
use tokio::time::Instant;

type Pool = ConnectionPool<common::Conn, Probing>;

fn pool(max_connections: usize, connect: Outcome) -> (Pool, Probing) {
    let connector = Probing::new(Script::always(connect));
    let pool = ConnectionPool::builder()
        .max_connections(max_connections)
        .connector(connector.clone())
        .build()
        .unwrap();
    (pool, connector)
}

#[tokio::test(start_paused = true)]
async fn i4_duplicates_connect_once_and_the_report_keeps_the_first_order() {
    let (pool, connector) = pool(0, Outcome::Ok(10 * MS));
    let given = [addr(2), addr(0), addr(2), addr(1), addr(0)];
    let report = pool.warm_up(&given, 4).await;
    let order: Vec<_> = report.results().iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(order, [addr(2), addr(0), addr(1)]);
    assert!(report.is_complete());
    assert_eq!(
        connector.connects(),
        3,
        "I4 violated: an address given twice was dialled twice"
    );
    assert_eq!(pool.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_bound_is_observed_at_the_connector() {
    let (pool, connector) = pool(0, Outcome::Ok(100 * MS));
    let addrs: Vec<_> = (0..20).map(addr).collect();
    let started = Instant::now();
    let report = pool.warm_up(&addrs, 3).await;
    assert_eq!(report.connected(), 20);
    assert_eq!(
        connector.most_connects_at_once(),
        3,
        "the bound is reached, never passed"
    );
    assert_took(
        started,
        7 * 100 * MS,
        "20 connects, 3 at a time, 100 ms each",
    );
}

#[tokio::test(start_paused = true)]
async fn zero_concurrency_connects_one_at_a_time() {
    let (pool, connector) = pool(0, Outcome::Ok(10 * MS));
    let report = pool.warm_up([addr(0), addr(1), addr(2)], 0).await;
    assert!(report.is_complete());
    assert_eq!(connector.most_connects_at_once(), 1);
}

#[tokio::test(start_paused = true)]
async fn i1_i3_capacity_smaller_than_the_set_is_respected() {
    let (pool, connector) = pool(2, Outcome::Ok(10 * MS));
    let addrs: Vec<_> = (0..5).map(addr).collect();
    let report = pool.warm_up(&addrs, 5).await;
    assert_eq!(report.connected(), 2);
    let refused: Vec<_> = report.failures().collect();
    assert_eq!(refused.len(), 3);
    assert!(
        refused
            .iter()
            .all(|(_, e)| matches!(e, PoolError::AtCapacity { max: 2, .. })),
        "{refused:?}"
    );
    assert_eq!(
        connector.connects(),
        2,
        "I1 violated: dialled beyond the cap"
    );
    assert_eq!(pool.used_slots(), 2, "I3 violated");
}

#[tokio::test(start_paused = true)]
async fn one_refusing_address_does_not_stop_the_others_and_backs_off_i12() {
    let (pool, connector) = pool(0, Outcome::Ok(10 * MS));
    connector.refuse(addr(1));
    let addrs = [addr(0), addr(1), addr(2)];
    let report = pool.warm_up(&addrs, 2).await;
    assert_eq!(report.connected(), 2);
    let failures: Vec<_> = report.failures().collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, &addr(1));
    assert!(
        matches!(failures[0].1, PoolError::Connect { .. }),
        "{:?}",
        failures[0].1
    );

    // Again at once: the pooled addresses are not dialled again, the refusing one is backing off.
    let again = pool.warm_up(&addrs, 2).await;
    assert!(
        matches!(again.results()[1].1, Err(PoolError::Backoff { .. })),
        "I12 violated"
    );
    assert_eq!(
        connector.connects(),
        3,
        "I12 violated: dialled again while backing off"
    );
    assert_eq!(
        again.results()[0].1.as_ref().unwrap().id(),
        report.results()[0].1.as_ref().unwrap().id()
    );
}

#[tokio::test(start_paused = true)]
async fn i16_a_hanging_connect_ends_at_the_connect_timeout() {
    let script = Script::default();
    script.then(Outcome::Hang).set_default(Outcome::Ok(10 * MS));
    let connector = Probing::new(script);
    let pool = ConnectionPool::builder()
        .connect_timeout(2 * SEC)
        .connector(connector.clone())
        .build()
        .unwrap();
    let started = Instant::now();
    let report = pool.warm_up([addr(0), addr(1)], 1).await;
    assert!(matches!(
        report.results()[0].1,
        Err(PoolError::ConnectTimeout { .. })
    ));
    assert!(report.results()[1].1.is_ok());
    assert_took(started, 2 * SEC + 10 * MS, "I16 violated");
}

#[tokio::test(start_paused = true)]
async fn i17_after_close_every_address_is_closed() {
    let (pool, connector) = pool(0, Outcome::Ok(10 * MS));
    pool.close().await;
    let report = pool.warm_up([addr(0), addr(1)], 2).await;
    assert!(
        report
            .results()
            .iter()
            .all(|(_, r)| matches!(r, Err(PoolError::Closed)))
    );
    assert_eq!(connector.connects(), 0, "I17 violated: dialled after close");
}
