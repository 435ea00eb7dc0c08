//! Idle eviction: I5 (in flight or recently used: never idle), I6 (idle: gone by the next sweep).
//! I7 is tested at the seam between a sweep's look and its removal, in `src/sweep.rs`.

mod common;

use std::time::Duration;

use common::{MS, SEC, addr, advance};
use keyed_pool::ConnectionPool;

const MAX_IDLE: Duration = Duration::from_secs(10);

fn pool() -> ConnectionPool<u32> {
    ConnectionPool::new(0, MAX_IDLE)
}

#[tokio::test(start_paused = true)]
async fn i5_connection_with_call_in_flight_is_never_evicted_as_idle() {
    let pool = pool();
    pool.insert(addr(0), 0);
    let conn = pool.get(addr(0)).unwrap();
    let call = conn.begin();
    advance(10 * MAX_IDLE).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: evicted with a call in flight"
    );
    assert!(pool.peek(addr(0)).is_some());
    call.success();
    // Finishing the call is a use: still not idle for another MAX_IDLE. (Sleeps may overshoot by
    // a hair under madsim, so edges are tested ±1 ms here and exactly in src/sweep.rs.)
    advance(MAX_IDLE - MS).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: evicted within max_idle of a call"
    );
    advance(2 * MS).await;
    assert_eq!(pool.evict_idle().await, 1, "I6: idle past max_idle must go");
    assert_eq!(pool.stats().evictions.idle, 1);
}

#[tokio::test(start_paused = true)]
async fn i5_cancelled_call_also_protects_while_in_flight() {
    let pool = pool();
    pool.insert(addr(0), 0);
    let call = pool.get(addr(0)).unwrap().begin();
    advance(2 * MAX_IDLE).await;
    assert_eq!(pool.evict_idle().await, 0, "I5 violated");
    drop(call); // cancelled: no outcome, but the clock moved and the call is no longer in flight
    let m = pool.get_metrics(addr(0)).unwrap();
    assert_eq!(
        (m.in_flight(), m.cancelled_count(), m.request_count()),
        (0, 1, 0)
    );
    advance(MAX_IDLE + MS).await;
    assert_eq!(pool.evict_idle().await, 1);
}

/// A `get` reads no clock: it marks the connection used, and the sweep folds the mark in at its
/// own instant. Never early (I5): kept by every sweep within `max_idle` of the `get`, and by the
/// sweep that folds it in. Late by at most the time to that fold (I6): gone `max_idle` after it.
#[tokio::test(start_paused = true)]
async fn i5_get_moves_the_idle_clock() {
    let pool = pool();
    pool.insert(addr(0), 0);
    advance(MAX_IDLE - MS).await;
    pool.get(addr(0)).unwrap();
    advance(MAX_IDLE - MS).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: evicted within max_idle after get"
    );
    // That sweep folded the get in at its instant: fresh for another max_idle from there.
    advance(MAX_IDLE - MS).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: evicted within max_idle of the sweep that folded the get in"
    );
    advance(2 * MS).await;
    assert_eq!(
        pool.evict_idle().await,
        1,
        "I6 violated: idle 1 ms past max_idle after the fold survived"
    );
}

/// With the cleanup task, a connection last used by a bare `get` survives `max_idle` after it (I5)
/// and is gone by `max_idle + 2 × interval` after it (I6): one interval until a sweep folds the
/// `get` in, one more until the sweep after the fold's edge.
#[tokio::test(start_paused = true)]
async fn i6_a_get_is_gone_by_max_idle_plus_two_intervals() {
    let pool = pool();
    let interval = 2 * SEC;
    pool.insert(addr(0), 0);
    let _task = pool.start_cleanup_task(interval);
    // Just after a sweep: the worst case, the fold waits almost a whole interval.
    advance(interval + MS).await;
    pool.get(addr(0)).unwrap();
    advance(MAX_IDLE - MS).await;
    assert!(
        pool.peek(addr(0)).is_some(),
        "I5 violated: evicted within max_idle of a get"
    );
    advance(2 * interval + 2 * MS).await;
    assert!(
        pool.peek(addr(0)).is_none(),
        "I6 violated: still pooled max_idle + 2 x interval after its last get"
    );
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn i5_recorded_results_move_the_idle_clock() {
    let pool = pool();
    pool.insert(addr(0), 0);
    pool.insert(addr(1), 1);
    advance(MAX_IDLE).await;
    pool.record_success(addr(0), 2 * MS);
    pool.record_error(addr(1));
    advance(MS).await;
    assert_eq!(
        pool.evict_idle().await,
        0,
        "I5 violated: recorded results did not count as use"
    );
    advance(MAX_IDLE).await;
    assert_eq!(pool.evict_idle().await, 2);
}

#[tokio::test(start_paused = true)]
async fn i5_peek_does_not_move_the_idle_clock() {
    let pool = pool();
    pool.insert(addr(0), 0);
    advance(MAX_IDLE).await;
    pool.peek(addr(0)).unwrap();
    pool.get_metrics(addr(0)).unwrap();
    advance(MS).await;
    assert_eq!(pool.evict_idle().await, 1);
}

#[tokio::test(start_paused = true)]
async fn i6_idle_connection_gone_by_max_idle_plus_interval() {
    let pool = pool();
    let interval = 2 * SEC;
    pool.insert(addr(0), 0);
    pool.insert(addr(1), 1);
    let _task = pool.start_cleanup_task(interval);
    // Keep addr(1) busy the whole time.
    let call = pool.get(addr(1)).unwrap().begin();
    advance(MAX_IDLE).await;
    assert!(pool.peek(addr(0)).is_some(), "evicted before max_idle");
    advance(interval + MS).await;
    assert!(
        pool.peek(addr(0)).is_none(),
        "I6 violated: idle past max_idle + interval"
    );
    assert!(
        pool.peek(addr(1)).is_some(),
        "I5 violated by the cleanup task"
    );
    drop(call);
    pool.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn zero_max_idle_disables_idle_eviction() {
    let pool: ConnectionPool<u32> = ConnectionPool::new(0, Duration::ZERO);
    pool.insert(addr(0), 0);
    advance(Duration::from_secs(24 * 3600)).await;
    assert_eq!(pool.evict_idle().await, 0);
    assert_eq!(pool.config().max_idle, None);
}

/// A sweep of a large pool yields between chunks of evictions, so other tasks on its thread run
/// while it works (the benches measured a 100,000-connection sweep holding its thread ~30 ms).
///
/// Checked without a second task, so it holds under every order a scheduler may pick (madsim
/// draws the order of ready tasks from its seed): the sweep is polled by hand, once. Its first poll
/// must stop part-way, at a yield, with some but not all of the idle connections gone; the rest go
/// when it is driven to the end.
#[tokio::test(start_paused = true)]
async fn a_large_sweep_yields_part_way() {
    let pool = pool();
    for i in 0..1000 {
        pool.insert(format!("10.1.{}.{}:1", i / 250, i % 250), i);
    }
    advance(MAX_IDLE + MS).await;
    let mut sweep = std::pin::pin!(pool.evict_idle());
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(sweep.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "the sweep of 1000 ran to the end in one poll: it never yields"
    );
    let left_mid_sweep = pool.len();
    assert!(
        0 < left_mid_sweep && left_mid_sweep < 1000,
        "the sweep yielded before evicting anything or after evicting everything (left {left_mid_sweep})"
    );
    assert_eq!(
        sweep.await,
        1000,
        "I6: every idle connection is gone once the sweep ends"
    );
    assert!(pool.is_empty(), "I6");
}

/// A sweep of a pool larger than it looks at inline (4,096 addresses) looks on the runtime's
/// blocking pool, so the other tasks of its runtime thread run while it looks (issue 16: the look
/// of 100,000 took 4–12 ms, all of it on the sweep's thread).
///
/// Checked from inside the look: the connector's `is_open`, which the health sweep's look calls for
/// every connection, waits on its first call until a neighbour task on the test's only runtime
/// thread has run. Had the look run on that thread, the neighbour could not run; the wait is
/// bounded (10 s) so that such a failure reports instead of hanging.
///
/// Not under madsim: its blocking pool is a task on the simulation's one thread (where a held
/// thread costs no virtual time), so there the look runs where the neighbour does, by design.
#[cfg(not(madsim))]
#[tokio::test]
async fn a_large_sweep_lets_other_tasks_run_while_it_looks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use keyed_pool::Connector;

    #[derive(Default)]
    struct Gate {
        neighbour_ran: Arc<AtomicBool>,
        /// The thread of the look's first `is_open`, and whether the neighbour had run by then.
        first_look: Mutex<Option<(ThreadId, bool)>>,
    }
    impl Connector for Gate {
        type Conn = u32;
        type Error = std::io::Error;
        async fn connect(&self, _addr: &str) -> std::io::Result<u32> {
            Ok(0)
        }
        fn is_open(&self, _conn: &u32) -> bool {
            let mut first = self.first_look.lock().unwrap();
            if first.is_none() {
                let give_up = std::time::Instant::now() + Duration::from_secs(10);
                while !self.neighbour_ran.load(Ordering::Acquire)
                    && std::time::Instant::now() < give_up
                {
                    std::thread::yield_now();
                }
                let ran = self.neighbour_ran.load(Ordering::Acquire);
                *first = Some((std::thread::current().id(), ran));
            }
            true
        }
    }

    let gate = Gate::default();
    let neighbour_ran = Arc::clone(&gate.neighbour_ran);
    let pool = ConnectionPool::builder().connector(gate).build().unwrap();
    for i in 0..5000u32 {
        pool.try_insert(format!("10.2.{}.{}:1", i / 250, i % 250), i)
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Runs only when the test's task yields: this runtime has one thread.
    let neighbour = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            while !stop.load(Ordering::Acquire) {
                neighbour_ran.store(true, Ordering::Release);
                tokio::task::yield_now().await;
            }
        }
    });
    assert_eq!(pool.evict_unhealthy().await, 0, "I8/I9: every one is fit");
    stop.store(true, Ordering::Release);
    neighbour.await.unwrap();
    let (looked_on, neighbour_had_run) = pool
        .connector()
        .first_look
        .lock()
        .unwrap()
        .expect("the look called is_open");
    assert!(
        neighbour_had_run,
        "the sweep held its runtime thread while it looked at 5000 connections: another task could not run"
    );
    assert_ne!(
        looked_on,
        std::thread::current().id(),
        "the look of 5000 ran on the runtime thread"
    );
}

/// Outside any runtime (a sweep polled by another executor) there is no blocking pool to look on: a
/// large sweep looks inline and still evicts everything it should (I9 through the health sweep).
/// Not under madsim, whose clock exists only inside its runtime.
#[cfg(not(madsim))]
#[test]
fn a_large_sweep_outside_any_runtime_looks_inline() {
    let pool = pool();
    for i in 0..5000u32 {
        pool.insert(format!("10.3.{}.{}:1", i / 250, i % 250), i);
    }
    for conn in pool.addresses() {
        pool.peek(&conn.addr).unwrap().mark_closed();
    }
    let mut sweep = std::pin::pin!(pool.evict_unhealthy());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let evicted = loop {
        if let std::task::Poll::Ready(n) = sweep.as_mut().poll(&mut cx) {
            break n;
        }
    };
    assert_eq!(evicted, 5000, "I8 violated: closed connections left pooled");
    assert!(pool.is_empty());
}
