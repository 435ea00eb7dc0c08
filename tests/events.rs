//! The event hook (`PoolEvents`): each event is reported once, with the right reason, at the place
//! it is decided; a hook that only counts is safe under concurrency.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{MS, Outcome, SEC, Script, addr, advance};
use keyed_pool::{ConnId, ConnectionPool, EvictionReason, PoolError, PoolEvents, WhenFull};

#[derive(Clone, Debug, PartialEq)]
enum Event {
    Connect(String, ConnId),
    ConnectFailed(String, &'static str),
    Evict(String, ConnId, EvictionReason),
    Backoff(String, Duration, u32),
    MarkUp(String),
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn push(&self, e: Event) {
        self.0.lock().unwrap().push(e);
    }
}

impl PoolEvents for Recorder {
    fn on_connect(&self, addr: &str, id: ConnId) {
        self.push(Event::Connect(addr.into(), id));
    }
    fn on_connect_failed(&self, addr: &str, error: &PoolError) {
        let kind = match error {
            PoolError::Connect { .. } => "connect",
            PoolError::ConnectTimeout { .. } => "timeout",
            _ => "other",
        };
        self.push(Event::ConnectFailed(addr.into(), kind));
    }
    fn on_evict(&self, addr: &str, id: ConnId, reason: EvictionReason) {
        self.push(Event::Evict(addr.into(), id, reason));
    }
    fn on_backoff(&self, addr: &str, delay: Duration, ejection_count: u32) {
        self.push(Event::Backoff(addr.into(), delay, ejection_count));
    }
    fn on_mark_up(&self, addr: &str) {
        self.push(Event::MarkUp(addr.into()));
    }
}

fn a(i: usize) -> String {
    addr(i).to_string()
}

/// Every eviction reason a hand-filled pool can produce, each reported once with its id.
#[tokio::test(start_paused = true)]
async fn every_eviction_is_reported_once_with_its_reason() {
    let rec = Recorder::default();
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .max_connections(2)
        .max_idle(10 * SEC)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .backoff(SEC, 60 * SEC, 0.0)
        .events(rec.clone())
        .build()
        .unwrap();

    // Replaced.
    let first = pool.try_insert(addr(0), 1).unwrap();
    pool.insert(addr(0), 2);
    assert_eq!(
        rec.take(),
        [Event::Evict(a(0), first.id(), EvictionReason::Replaced)]
    );

    // MakeRoom: the pool is full (2), the least recently used goes.
    advance(MS).await;
    let second = pool.try_insert(addr(1), 3).unwrap();
    let lru = pool.peek(addr(0)).unwrap();
    advance(MS).await;
    pool.get(addr(1)).unwrap(); // addr(1) is the more recently used
    pool.insert(addr(2), 4);
    assert_eq!(
        rec.take(),
        [Event::Evict(a(0), lru.id(), EvictionReason::MakeRoom)]
    );

    // Unhealthy: 5 failures, then the health sweep; the address backs off (I12).
    for _ in 0..5 {
        second.begin().failure();
    }
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(
        rec.take(),
        [
            Event::Evict(a(1), second.id(), EvictionReason::Unhealthy),
            Event::Backoff(a(1), SEC, 1),
        ]
    );

    // Closed, older than `short_lived` (5 s): no backoff.
    advance(6 * SEC).await;
    let third = pool.get(addr(2)).unwrap();
    third.mark_closed();
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(
        rec.take(),
        [Event::Evict(a(2), third.id(), EvictionReason::Closed)]
    );

    // Idle.
    let idle = pool.try_insert(addr(3), 5).unwrap();
    advance(11 * SEC).await;
    assert_eq!(pool.evict_idle().await, 1);
    assert_eq!(
        rec.take(),
        [Event::Evict(a(3), idle.id(), EvictionReason::Idle)]
    );

    // Manual: take_unclosed, remove_connection, close.
    let t = pool.try_insert(addr(4), 6).unwrap();
    pool.take_unclosed(addr(4)).unwrap();
    let r = pool.try_insert(addr(5), 7).unwrap();
    assert!(pool.remove_connection(&r));
    let c = pool.try_insert(addr(6), 8).unwrap();
    pool.close().await;
    assert_eq!(
        rec.take(),
        [
            Event::Evict(a(4), t.id(), EvictionReason::Manual),
            Event::Evict(a(5), r.id(), EvictionReason::Manual),
            Event::Evict(a(6), c.id(), EvictionReason::Manual),
        ]
    );

    // The hook saw exactly what the counters counted.
    let e = pool.stats().evictions;
    assert_eq!(
        (
            e.replaced,
            e.make_room,
            e.unhealthy,
            e.closed,
            e.idle,
            e.manual
        ),
        (1, 1, 1, 1, 1, 3)
    );
}

/// Connects, failed connects (refused and timed out) with the backoff each causes (I12), a
/// connection that died young (I12), and `mark_up`.
#[tokio::test(start_paused = true)]
async fn connects_failures_backoffs_and_mark_up_are_reported_in_order() {
    let rec = Recorder::default();
    let script = Script::default();
    script
        .then(Outcome::Fail(MS))
        .then(Outcome::Hang)
        .then(Outcome::Ok(MS));
    let pool = ConnectionPool::builder()
        .connector(script.clone())
        .backoff(SEC, 60 * SEC, 0.0)
        .connect_timeout(100 * MS)
        .events(rec.clone())
        .build()
        .unwrap();

    assert!(matches!(
        pool.get_or_connect(addr(0)).await,
        Err(PoolError::Connect { .. })
    ));
    assert_eq!(
        rec.take(),
        [
            Event::ConnectFailed(a(0), "connect"),
            Event::Backoff(a(0), SEC, 1)
        ]
    );
    assert!(matches!(
        pool.get_or_connect(addr(0)).await,
        Err(PoolError::Backoff { .. })
    ));
    assert_eq!(rec.take(), [], "meeting a backoff is not a new event");

    advance(SEC).await;
    assert!(matches!(
        pool.get_or_connect(addr(0)).await,
        Err(PoolError::ConnectTimeout { .. })
    ));
    let delay = Duration::from_millis(1600); // 1 s · 1.6, no jitter
    assert_eq!(
        rec.take(),
        [
            Event::ConnectFailed(a(0), "timeout"),
            Event::Backoff(a(0), delay, 2)
        ]
    );

    pool.mark_up(addr(0));
    assert_eq!(rec.take(), [Event::MarkUp(a(0))]);
    let conn = pool.get_or_connect(addr(0)).await.unwrap();
    assert_eq!(rec.take(), [Event::Connect(a(0), conn.id())]);

    // Dies young (under `short_lived`): evicted as closed, and the address backs off (I12).
    conn.client().open.store(false, Ordering::SeqCst);
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(
        rec.take(),
        [
            Event::Evict(a(0), conn.id(), EvictionReason::Closed),
            Event::Backoff(a(0), SEC, 1),
        ]
    );
}

struct Counting(Arc<AtomicU64>);

impl PoolEvents for Counting {
    fn on_evict(&self, _addr: &str, _id: ConnId, _reason: EvictionReason) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The hook's rules (quick, no call back into the pool) are all a counter needs: on a
/// multi-threaded runtime, many tasks replacing, removing and sweeping at once finish (no lock is
/// held against the hook), and the hook counts exactly the evictions the pool counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counting_hook_is_safe_under_concurrency_and_misses_nothing() {
    let seen = Arc::new(AtomicU64::new(0));
    let pool: ConnectionPool<u64> = ConnectionPool::builder()
        .max_connections(4)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .shard_amount(2) // few shards: the tasks meet on the same locks
        .events(Counting(Arc::clone(&seen)))
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..500u64 {
                    let key = addr(((t * 7 + i) % 6) as usize);
                    pool.insert(key.clone(), i);
                    if i % 5 == 0
                        && let Some(conn) = pool.peek(&key)
                    {
                        pool.remove_connection(&conn);
                    }
                    if i % 11 == 0 {
                        if let Some(conn) = pool.peek(&key) {
                            conn.mark_closed();
                        }
                        pool.evict_unhealthy().await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a hook under the entry lock must not stall the pool")
            .unwrap();
    }
    pool.clear();
    let counted = pool.stats().evictions.total();
    assert!(
        counted > 1000,
        "most inserts replace a present address: {counted}"
    );
    assert_eq!(seen.load(Ordering::Relaxed), counted);
}
