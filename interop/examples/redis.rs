//! The pool with Redis's multiplexed connection, in a few lines of output.
//!
//! ```sh
//! cargo run -p keyed-pool-interop --example redis
//! # or against servers of your own, on loopback:
//! REDIS_ADDRS=127.0.0.1:6379,127.0.0.1:6380 cargo run -p keyed-pool-interop --example redis
//! ```
//!
//! Without `REDIS_ADDRS` it starts three `redis-server`s on 127.0.0.1 (`bash
//! scripts/install-redis.sh` installs it), and then also kills one, shows the backoff, restarts it
//! and brings it back with `mark_up`. Bounded: a few hundred commands, a few seconds at most.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyed_pool::{CheetahString, ConnectionPool};
use keyed_pool_interop::server::{RedisServer, find_redis_server};
use keyed_pool_interop::{RedisConnector, call};
use redis::aio::MultiplexedConnection;

type Pool = ConnectionPool<MultiplexedConnection, RedisConnector>;

/// `tasks` tasks, each doing `rounds` SET + GET at every address at once; returns the commands
/// that succeeded, address by address.
async fn traffic(pool: &Pool, addrs: &[CheetahString], tasks: usize, rounds: usize) -> Vec<usize> {
    let addrs = Arc::new(addrs.to_vec());
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (pool, addrs) = (pool.clone(), Arc::clone(&addrs));
            tokio::spawn(async move {
                let mut ok = vec![0; addrs.len()];
                for round in 0..rounds {
                    for (i, addr) in addrs.iter().enumerate() {
                        let key = format!("example:{task}");
                        let set = redis::cmd("SET").arg(&key).arg(round).clone();
                        ok[i] += usize::from(call::<()>(&pool, addr, &set).await.is_ok());
                        let get = call::<usize>(&pool, addr, redis::cmd("GET").arg(&key)).await;
                        ok[i] += usize::from(get.is_ok_and(|v| v == round));
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = vec![0; addrs.len()];
    for handle in handles {
        for (sum, n) in ok.iter_mut().zip(handle.await.expect("traffic task")) {
            *sum += n;
        }
    }
    ok
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut servers = Vec::new();
    let addrs: Vec<CheetahString> = match std::env::var("REDIS_ADDRS") {
        Ok(list) => list.split(',').map(|a| a.trim().into()).collect(),
        Err(_) => {
            let Some(binary) = find_redis_server() else {
                eprintln!("redis-server not found: run `bash scripts/install-redis.sh`");
                std::process::exit(2);
            };
            for _ in 0..3 {
                servers.push(RedisServer::start(&binary).await.expect("redis-server"));
            }
            servers.iter().map(RedisServer::addr).collect()
        }
    };
    for addr in &addrs {
        let loopback = addr
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback {
            eprintln!("{addr}: this example talks to loopback addresses (ip:port) only");
            std::process::exit(2);
        }
    }
    let started = if servers.is_empty() {
        "given"
    } else {
        "started"
    };
    println!("{} redis-server(s) {started}: {addrs:?}", addrs.len());

    let pool: Pool = ConnectionPool::builder()
        .max_connections(8)
        .connect_timeout(Duration::from_secs(1))
        .call_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(200), Duration::from_secs(2), 0.2)
        .connector(RedisConnector)
        .build()
        .expect("valid config");

    let t = Instant::now();
    let ok: usize = traffic(&pool, &addrs, 8, 50).await.iter().sum();
    let s = pool.stats();
    println!(
        "{ok} commands ok from 8 tasks in {:.0?}: {} connections, {} connects (one per address, {} \
         callers joined one in flight)",
        t.elapsed(),
        s.total,
        s.connects.attempted,
        s.connects.shared
    );

    if let Some(server) = servers.last_mut() {
        let addr = server.addr();
        server.kill();
        let err = call::<()>(&pool, &addr, &redis::cmd("PING"))
            .await
            .unwrap_err();
        println!("killed {addr}: PING -> {err}");
        let err = call::<()>(&pool, &addr, &redis::cmd("PING"))
            .await
            .unwrap_err();
        println!("again: {err}");
        let ok = traffic(&pool, &addrs, 8, 10).await;
        let s = pool.stats();
        println!(
            "meanwhile, commands ok by address: {ok:?} of {} each; evicted: {} closed; {} callers \
             turned away without a connect",
            8 * 10 * 2,
            s.evictions.closed,
            s.connects.backoff_rejections
        );
        server.restart().expect("restart");
        server.wait_ready().await.expect("restarted");
        pool.mark_up(&addr);
        let t = Instant::now();
        let pong: String = call(&pool, &addr, &redis::cmd("PING")).await.expect("back");
        println!(
            "restarted {addr}, mark_up: {pong} after {:.1?} (backoff ended at once)",
            t.elapsed()
        );
    }
    let s = pool.stats();
    println!(
        "stats: {} connections, {} healthy; connects {} attempted, {} succeeded, {} failed",
        s.total, s.healthy, s.connects.attempted, s.connects.succeeded, s.connects.failed
    );
    pool.close().await;
}
