//! Capacity: I1 (the cap holds at every instant) and I2 (re-inserting never fails for capacity),
//! plus the `WhenFull` policies.

mod common;

use common::{MS, SEC, addr, advance};
use keyed_pool::{ConnectionPool, PoolError, WhenFull};

#[tokio::test(start_paused = true)]
async fn i1_insert_refused_when_full() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(3, 60 * SEC);
    for i in 0..3 {
        assert!(
            pool.insert(addr(i), i as u32),
            "I1: slot {i} of 3 must be free"
        );
    }
    assert!(
        !pool.insert(addr(3), 3),
        "I1 violated: a 4th connection in a pool of 3"
    );
    assert!(matches!(
        pool.try_insert(addr(4), 4),
        Err(PoolError::AtCapacity {
            max: 3,
            live: 3,
            connecting: 0
        })
    ));
    assert_eq!(pool.len(), 3);
    assert_eq!(pool.used_slots(), 3);
    assert_eq!(pool.stats().rejected_capacity, 2);
    // Removing one frees exactly one slot.
    pool.take_unclosed(addr(0)).expect("present");
    assert!(pool.insert(addr(3), 3));
    assert!(!pool.insert(addr(4), 4));
}

#[tokio::test(start_paused = true)]
async fn i2_reinsert_never_fails_for_capacity_nor_changes_count() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(2, 60 * SEC);
    assert!(pool.insert(addr(0), 0));
    assert!(pool.insert(addr(1), 1));
    for round in 0..10 {
        assert!(
            pool.insert(addr(0), 100 + round),
            "I2 violated: re-insert refused for capacity"
        );
        assert_eq!(pool.len(), 2, "I2 violated: re-insert changed the count");
        assert_eq!(pool.used_slots(), 2, "I2 violated: re-insert took a slot");
    }
    assert_eq!(*pool.get(addr(0)).unwrap().client(), 109);
    assert_eq!(pool.stats().evictions.replaced, 10);
}

#[tokio::test(start_paused = true)]
async fn i2_concurrent_inserts_of_one_address_take_one_slot() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(1, 60 * SEC);
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                pool.insert(addr(0), i)
            })
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap(),
            "I2 violated: an insert of the same address was refused"
        );
    }
    assert_eq!(pool.len(), 1);
    assert_eq!(
        pool.used_slots(),
        1,
        "I2 violated: replaced connections kept slots"
    );
}

/// I1 on a multi-thread runtime: inserters, replacers and removers race on more addresses than
/// slots while a watcher samples the ledger and the map continuously.
#[cfg(not(madsim))]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn i1_cap_holds_at_every_instant_under_concurrent_inserts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const MAX: usize = 8;
    let pool: ConnectionPool<u64> = ConnectionPool::builder()
        .max_connections(MAX)
        .shard_amount(4)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (pool, stop, samples) = (pool.clone(), stop.clone(), samples.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // The exact figure: a slot is taken before a connection becomes visible and given
                // back after it is gone, so live <= used at every instant. (`len()` counts shard by
                // shard and can see a concurrently replaced connection twice: checked at rest.)
                let used = pool.used_slots();
                assert!(used <= MAX, "I1 violated: {used} slots used of {MAX}");
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let workers: Vec<_> = (0..8u64)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut accepted = 0u64;
                for i in 0..4_000u64 {
                    let a = addr(((w * 7919 + i * 31) % 64) as usize);
                    match i % 4 {
                        0 | 1 => accepted += u64::from(pool.insert(a, i)),
                        2 => {
                            pool.take_unclosed(&a);
                        }
                        _ => {
                            if let Some(c) = pool.get(&a) {
                                pool.remove_connection(&c);
                            }
                        }
                    }
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for w in workers {
        accepted += w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(accepted > 0 && samples.load(Ordering::Relaxed) > 0);
    assert!(
        pool.stats().rejected_capacity > 0,
        "the test must actually reach the cap"
    );
    // Quiescent: the ledger and the map agree exactly.
    assert_eq!(
        pool.used_slots(),
        pool.len(),
        "I1/I3: ledger and map disagree at rest"
    );
    assert!(pool.len() <= MAX);
}

/// The same race from plain OS threads (no runtime at all: `insert` is synchronous).
#[cfg(not(madsim))]
#[test]
fn i1_cap_holds_under_os_threads() {
    use std::time::Duration;

    const MAX: usize = 5;
    let pool: ConnectionPool<u64> = ConnectionPool::builder()
        .max_connections(MAX)
        .max_idle(Duration::ZERO)
        .build()
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let pool = &pool;
            s.spawn(move || {
                for i in 0..20_000u64 {
                    let a = addr(((t * 13 + i) % 40) as usize);
                    if i % 3 == 2 {
                        pool.take_unclosed(&a);
                    } else {
                        pool.insert(a, i);
                    }
                    let used = pool.used_slots();
                    assert!(used <= MAX, "I1 violated: {used} slots used of {MAX}");
                }
            });
        }
    });
    assert_eq!(pool.used_slots(), pool.len());
}

#[tokio::test(start_paused = true)]
async fn when_full_lru_evicts_least_recently_used_but_never_one_in_flight() {
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .max_connections(3)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    for i in 0..3 {
        assert!(pool.insert(addr(i), i as u32));
        advance(10 * MS).await;
    }
    // addr(0) is the least recently used, but a call is in flight on it: it must survive (I5's
    // spirit: a connection in use is never taken away). addr(1) is next.
    let busy = pool.get(addr(0)).unwrap();
    advance(10 * MS).await;
    let call = busy.begin();
    advance(10 * MS).await;
    // Touch addr(2) so addr(1) is now the oldest without a call.
    pool.get(addr(2)).unwrap();
    assert!(pool.insert(addr(3), 3), "room must be made");
    assert!(
        pool.peek(addr(0)).is_some(),
        "a connection with a call in flight was evicted"
    );
    assert!(
        pool.peek(addr(1)).is_none(),
        "the LRU idle connection should have gone"
    );
    assert_eq!(pool.len(), 3);
    call.success();
    let evictions = pool.stats().evictions;
    assert_eq!(
        (evictions.make_room, evictions.manual),
        (1, 0),
        "an LRU eviction is counted as MakeRoom, not Manual"
    );
}

#[tokio::test(start_paused = true)]
async fn when_full_lru_rejects_if_every_connection_is_busy() {
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .max_connections(2)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    assert!(pool.insert(addr(0), 0));
    assert!(pool.insert(addr(1), 1));
    let calls: Vec<_> = (0..2).map(|i| pool.get(addr(i)).unwrap().begin()).collect();
    assert!(matches!(
        pool.try_insert(addr(2), 2),
        Err(PoolError::AtCapacity {
            max: 2,
            live: 2,
            connecting: 0
        })
    ));
    assert_eq!(pool.len(), 2);
    drop(calls);
    assert!(pool.insert(addr(2), 2));
}

/// The LRU take claims only the connection it takes: the others it looked at stay as they were,
/// fit for calls and for idle eviction (I6).
#[tokio::test(start_paused = true)]
async fn i6_when_full_lru_leaves_the_connections_it_did_not_take_untouched() {
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .max_connections(3)
        .max_idle(60 * SEC)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    for i in 0..3 {
        assert!(pool.insert(addr(i), i as u32));
        advance(10 * MS).await;
    }
    assert!(pool.insert(addr(3), 3), "room must be made");
    assert!(
        pool.peek(addr(0)).is_none(),
        "the least recently used one went"
    );
    assert_eq!(pool.stats().evictions.make_room, 1);
    advance(61 * SEC).await;
    assert_eq!(
        pool.evict_idle().await,
        3,
        "I6 violated: a connection the LRU take looked at but left cannot be evicted as idle"
    );
    assert_eq!(pool.len(), 0);
}

/// Connections with a call in flight are no candidates of the LRU take, however old: with more of
/// them than the take tries at once (8), the idle connection behind them is still found.
#[tokio::test(start_paused = true)]
async fn when_full_lru_finds_the_idle_connection_behind_many_busy_ones() {
    let pool: ConnectionPool<u32> = ConnectionPool::builder()
        .max_connections(10)
        .when_full(WhenFull::EvictLeastRecentlyUsed)
        .build()
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..9 {
        assert!(pool.insert(addr(i), i as u32));
        calls.push(pool.get(addr(i)).unwrap().begin());
        advance(10 * MS).await;
    }
    assert!(pool.insert(addr(9), 9));
    advance(10 * MS).await;
    assert!(
        pool.insert(addr(10), 10),
        "the idle connection behind nine busy ones was not found"
    );
    assert!(pool.peek(addr(9)).is_none(), "the idle one went");
    assert_eq!(pool.len(), 10);
    for call in calls {
        call.success();
    }
}
