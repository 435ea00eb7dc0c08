//! The TCP connector against a real listener on loopback: connect through the pool, exchange
//! bytes, and see a dead server turn into an evicted connection and a backed-off address (a
//! connection the server closed after serving is a graceful close; the failed reconnect backs off).

#![cfg_attr(madsim, allow(unused_imports, dead_code))]
mod common;

use std::time::Duration;

use common::SEC;
use keyed_pool::tcp::{TcpConnection, TcpConnector};
use keyed_pool::{ConnectionPool, PoolError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn pool() -> ConnectionPool<TcpConnection, TcpConnector> {
    ConnectionPool::builder()
        .connector(TcpConnector)
        .connect_timeout(2 * SEC)
        .backoff(30 * SEC, 60 * SEC, 0.0) // real time: must not run out between two calls
        .build()
        .unwrap()
}

// Real sockets only: madsim's loopback inside one node does not model a listener going away (a
// later connect still succeeds); the simulation in sim/ kills whole broker nodes instead.
#[cfg(not(madsim))]
#[tokio::test]
async fn tcp_connector_connects_exchanges_and_backs_off_from_a_dead_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.flush().await.unwrap();
        // Then the server goes away: the listener is dropped with this task.
    });
    let pool = pool();
    let conn = pool.get_or_connect(&addr).await.unwrap();
    {
        let call = conn.begin();
        let mut stream = conn.client().lock().await;
        stream.write_all(b"ping").await.unwrap();
        stream.flush().await.unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        call.success();
    }
    server.await.unwrap();
    // The server closed: the user sees EOF, marks the connection broken, the pool stops using it.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        conn.client().lock().await.read(&mut buf),
    )
    .await
    .expect("EOF arrives")
    .unwrap_or(0);
    assert_eq!(n, 0, "the server is gone");
    conn.client().mark_broken();
    assert!(
        pool.get(&addr).is_none(),
        "I8 violated: a broken stream was handed out"
    );
    // It served a call before the server closed it: a graceful close, not a failure of the
    // address (I12), so the next caller reconnects at once, finds nobody listening, and that
    // failure backs the address off; a topology signal ends the backoff at once.
    let reconnect = pool.get_or_connect(&addr).await;
    assert!(
        matches!(reconnect, Err(PoolError::Connect { .. })),
        "I12 violated: a graceful close backed the address off: {reconnect:?}"
    );
    assert!(matches!(
        pool.get_or_connect(&addr).await,
        Err(PoolError::Backoff { failures: 1, .. })
    ));
    pool.mark_up(&addr);
    let again = pool.get_or_connect(&addr).await;
    assert!(matches!(again, Err(PoolError::Connect { .. })), "{again:?}");
    let stats = pool.stats();
    assert_eq!((stats.connects.succeeded, stats.connects.failed), (1, 2));
    assert_eq!(stats.evictions.closed, 1);
    pool.close().await;
}
