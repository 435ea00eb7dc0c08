//! The scenarios. Each builds a world from its seed, drives traffic and faults, checks the
//! invariants after every step (and a monitor checks them every few ms), and ends with the liveness
//! phase (I15, I16) and a quiescence check (pool = connector = broker counts).

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyed_pool::core::BackoffPolicy;
use keyed_pool::{CheetahString, PoolError, PooledConnection, WhenFull};
use tokio::time::{Instant, sleep};

use crate::books::decay_interval;
use crate::broker::CloseMode;
use crate::client::{CallError, SimConn};
use crate::record::{Recorder, Violation};
use crate::trace;
use crate::world::{Ctx, Pool, Setup, chance, draw, ms};

/// What one seed of one scenario produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The first violation, if any.
    pub violation: Option<Violation>,
    /// Virtual time the run covered.
    pub virtual_time: Duration,
    /// Hash and length of the event trace (the determinism check compares them).
    pub trace: (u64, u64),
    /// The configuration drawn from the seed (printed for the swarm and on failure).
    pub info: String,
    /// The other invariants violated in the run, after the first (`"I18 I12"`).
    pub also: String,
}

/// A boxed scenario run.
pub type Run = Pin<Box<dyn Future<Output = Outcome>>>;

/// A scenario: a name, what it does, and its entry point (a plain `fn`, as madsim's determinism
/// check wants).
pub struct Scenario {
    /// Name on the command line.
    pub name: &'static str,
    /// One line on what it exercises.
    pub about: &'static str,
    /// Runs one seed (inside a madsim runtime).
    pub run: fn() -> Run,
    /// At most this many seeds when the whole suite runs (0 = no cap): for a scenario heavy
    /// enough to dominate the suite's time. Naming the scenario with `--scenario` lifts the cap.
    pub seed_cap: u64,
}

/// Every scenario, in the order the runner runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "restart-in-flight",
        about: "brokers killed/restarted while calls are in flight",
        run: || Box::pin(restart_in_flight()),
        seed_cap: 0,
    },
    Scenario {
        name: "partition-heal",
        about: "a broker cut off both ways, then healed; packet loss",
        run: || Box::pin(partition_heal()),
        seed_cap: 0,
    },
    Scenario {
        name: "one-way-partition",
        about: "requests or responses dropped on one link, then healed",
        run: || Box::pin(one_way_partition()),
        seed_cap: 0,
    },
    Scenario {
        name: "slow-broker",
        about: "a broker slower than the call timeout and than max_idle (I5, I9, I12)",
        run: || Box::pin(slow_broker()),
        seed_cap: 0,
    },
    Scenario {
        name: "flapping-broker",
        about: "kill/restart at random intervals, plus pause/resume",
        run: || Box::pin(flapping_broker()),
        seed_cap: 0,
    },
    Scenario {
        name: "connect-storm",
        about: "many workers reconnect at once after a mass eviction (I1, I4)",
        run: || Box::pin(connect_storm()),
        seed_cap: 0,
    },
    Scenario {
        name: "idle-edge",
        about: "idle eviction exactly at max_idle and max_idle + 1 ms, with calls across the edge (I5, I6)",
        run: || Box::pin(idle_edge()),
        seed_cap: 0,
    },
    Scenario {
        name: "capacity",
        about: "many more brokers than slots, LRU eviction, faults (I1, I3)",
        run: || Box::pin(capacity()),
        seed_cap: 0,
    },
    Scenario {
        name: "cleanup-race",
        about: "cleanup every 1 ms racing get/insert/remove (I2, I7, I14)",
        run: || Box::pin(cleanup_race()),
        seed_cap: 0,
    },
    Scenario {
        name: "close-mid-traffic",
        about: "close() while calls and connects are in flight (I17)",
        run: || Box::pin(close_mid_traffic()),
        seed_cap: 0,
    },
    Scenario {
        name: "drop-mid-traffic",
        about: "the last pool handle dropped mid-traffic (I17)",
        run: || Box::pin(drop_mid_traffic()),
        seed_cap: 0,
    },
    Scenario {
        name: "dead-broker",
        about: "a broker that never comes back: connects bounded by backoff (I12)",
        run: || Box::pin(dead_broker()),
        seed_cap: 0,
    },
    Scenario {
        name: "remoting",
        about: "the library's RemotingClient/RemotingConnector against MiniServers under faults",
        run: || Box::pin(crate::remoting::remoting()),
        seed_cap: 0,
    },
    Scenario {
        name: "swarm",
        about: "configuration and fault mix drawn from the seed (VOPR-style)",
        run: || Box::pin(swarm()),
        seed_cap: 0,
    },
    Scenario {
        name: "accept-then-close",
        about: "a broker that accepts every connection and closes it at once: ejections, growing backoff, decay (I12, I18)",
        run: || Box::pin(accept_then_close()),
        seed_cap: 0,
    },
    Scenario {
        name: "fail-every-request",
        about: "a broker that accepts connections and fails every request: backoff grows across connects, decays (I12, I18)",
        run: || Box::pin(fail_every_request()),
        seed_cap: 0,
    },
    Scenario {
        name: "silent-between-uses",
        about: "brokers that hang while their connections sit idle: found by the cleanup task's probes before any call, compared with a pool that does not probe (I5, I6, I12)",
        run: || Box::pin(silent_between_uses()),
        seed_cap: 0,
    },
    Scenario {
        name: "call-api",
        about: "pool.call with a call timeout against brokers made slow and erroring; calls dropped by their callers (I9, I13, I16)",
        run: || Box::pin(call_api()),
        seed_cap: 0,
    },
    Scenario {
        name: "checkout-storm",
        about: "many tasks check out from three brokers, one slow; max_per_address > 1, the cap below their sum; callers cancelled at random (I1, I19-I22, fairness)",
        run: || Box::pin(crate::checkout::checkout_storm()),
        seed_cap: 0,
    },
    Scenario {
        name: "checkout-broker-killed",
        about: "the broker with the most checkouts outstanding killed, restarted later; sometimes close() with checkouts outstanding (I17, I19-I22)",
        run: || Box::pin(crate::checkout::checkout_broker_killed()),
        seed_cap: 0,
    },
    Scenario {
        name: "churning-addresses",
        about: "100,000 addresses that each fail once, never used again, cleanup running: bounded per-address state (I18)",
        run: || Box::pin(churning_addresses()),
        seed_cap: CHURN_SEED_CAP,
    },
];

/// The `&'static str` of an invariant name read back from a child process.
pub fn static_inv(name: &str) -> &'static str {
    const NAMES: &[&str] = &[
        "I1", "I2", "I3", "I4", "I5", "I6", "I7", "I8", "I9", "I10", "I11", "I12", "I13", "I14",
        "I15", "I16", "I17", "I18", "I19", "I20", "I21", "I22", "FAIR", "ACC", "SIM",
    ];
    NAMES.iter().find(|n| **n == name).copied().unwrap_or("SIM")
}

/// Runs `body` on the client node of a world built from `setup`, and collects the outcome.
pub(crate) async fn world<F, Fut>(setup: Setup, info: String, body: F) -> Outcome
where
    F: FnOnce(Arc<Ctx>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rec = Arc::new(Recorder::new());
    let started = Instant::now();
    trace!(rec, "setup {info}");
    let (ctx, client) = Ctx::build(setup, Arc::clone(&rec));
    let task = client.spawn(async move {
        ctx.brokers_ready().await;
        body(ctx).await;
    });
    if let Err(err) = task.await {
        rec.fail("SIM", format!("the scenario task failed: {err}"));
    }
    Outcome {
        violation: rec.first(),
        also: rec.also(),
        virtual_time: started.elapsed(),
        trace: rec.trace(),
        info,
    }
}

/// Traffic plan of the standard shape.
struct Traffic {
    workers: usize,
    length: Duration,
    work: std::ops::Range<u64>,
    think: std::ops::Range<u64>,
}

/// The standard shape: cleanup task, monitor, workers on every broker, the fault `director`
/// (which runs until the traffic ends), then liveness and quiescence.
async fn standard<D, DFut>(ctx: Arc<Ctx>, traffic: Traffic, director: D)
where
    D: FnOnce(Arc<Ctx>, Pool, Instant) -> DFut,
    DFut: Future<Output = ()>,
{
    standard_with(ctx, traffic, director, false).await;
}

/// [`standard`], with the decay phase between liveness and quiescence if `decay`.
async fn standard_with<D, DFut>(ctx: Arc<Ctx>, traffic: Traffic, director: D, decay: bool)
where
    D: FnOnce(Arc<Ctx>, Pool, Instant) -> DFut,
    DFut: Future<Output = ()>,
{
    let pool = ctx.pool();
    let cleanup = ctx.start_cleanup(&pool);
    let monitor = ctx.monitor(&pool, ms(5));
    let until = Instant::now() + traffic.length;
    let targets: Vec<usize> = (0..ctx.brokers.len()).collect();
    let think_max = traffic.think.end;
    let workers = ctx.workers(
        &pool,
        traffic.workers,
        &targets,
        until,
        traffic.work,
        traffic.think,
    );
    director(Arc::clone(&ctx), pool.clone(), until).await;
    let left = until.saturating_duration_since(Instant::now());
    let bound =
        left + ctx.setup.config.connect_timeout + ctx.setup.call_timeout + ms(think_max + 10);
    ctx.join("worker", workers, bound).await;
    ctx.step(&pool, format_args!("traffic over"));
    ctx.liveness(&pool, &targets).await;
    if decay {
        ctx.decay_phase(&pool, &targets).await;
    }
    ctx.quiesce(&pool, cleanup).await;
    let _ = monitor.await;
}

fn pick(ctx: &Ctx) -> usize {
    draw(0..ctx.brokers.len() as u64) as usize
}

async fn restart_in_flight() -> Outcome {
    let mut setup = Setup::new(3);
    setup.call_timeout = ms(500);
    world(setup, String::new(), |ctx| async move {
        let traffic = Traffic {
            workers: 6,
            length: ms(4000),
            work: 20..200,
            think: 1..20,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(100..600))).await;
                let b = pick(&ctx);
                if chance(0.5) {
                    ctx.restart(b);
                } else {
                    ctx.kill(b);
                    ctx.step(&pool, format_args!("killed b{b}"));
                    sleep(ms(draw(1..300))).await;
                    ctx.restart(b);
                }
                ctx.step(&pool, format_args!("restarted b{b}"));
            }
        })
        .await;
    })
    .await
}

async fn partition_heal() -> Outcome {
    world(Setup::new(3), String::new(), |ctx| async move {
        let traffic = Traffic {
            workers: 6,
            length: ms(6000),
            work: 0..30,
            think: 1..20,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(100..500))).await;
                if chance(0.3) {
                    ctx.net(draw(0..30) as f64 / 100.0, ms(1)..ms(draw(2..40)));
                }
                let b = pick(&ctx);
                ctx.clog(b);
                ctx.step(&pool, format_args!("clogged b{b}"));
                sleep(ms(draw(100..3000))).await;
                ctx.unclog(b);
                ctx.step(&pool, format_args!("healed b{b}"));
            }
        })
        .await;
    })
    .await
}

async fn one_way_partition() -> Outcome {
    world(Setup::new(3), String::new(), |ctx| async move {
        let traffic = Traffic {
            workers: 6,
            length: ms(6000),
            work: 0..30,
            think: 1..20,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(100..500))).await;
                let b = pick(&ctx);
                let to_broker = chance(0.5);
                ctx.clog_one_way(b, to_broker);
                ctx.step(&pool, format_args!("one-way clog b{b} {to_broker}"));
                sleep(ms(draw(100..3000))).await;
                ctx.faults_off().await;
                ctx.step(&pool, format_args!("healed b{b}"));
            }
        })
        .await;
    })
    .await
}

async fn slow_broker() -> Outcome {
    let mut setup = Setup::new(3);
    let max_idle = ms(draw(100..400));
    setup.config.max_idle = Some(max_idle);
    setup.cleanup = Some(ms(draw(5..50)));
    setup.call_timeout = ms(1000);
    let info = format!("max_idle={max_idle:?} cleanup={:?}", setup.cleanup);
    world(setup, info, move |ctx| async move {
        // Calls that work longer than max_idle: never evicted as idle meanwhile (I5).
        let work_max = 2 * u64::try_from(max_idle.as_millis()).unwrap_or(1000);
        let traffic = Traffic {
            workers: 6,
            length: ms(6000),
            work: 0..work_max,
            think: 1..50,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                let b = pick(&ctx);
                ctx.slow(b, ms(draw(100..1500)));
                if chance(0.3) {
                    ctx.errors(b, draw(100..900) as u32);
                }
                ctx.step(&pool, format_args!("slowed b{b}"));
                sleep(ms(draw(300..2000))).await;
                ctx.slow(b, Duration::ZERO);
                ctx.errors(b, 0);
                ctx.step(&pool, format_args!("b{b} fast again"));
                sleep(ms(draw(10..500))).await;
            }
        })
        .await;
    })
    .await
}

async fn flapping_broker() -> Outcome {
    world(Setup::new(3), String::new(), |ctx| async move {
        let traffic = Traffic {
            workers: 6,
            length: ms(6000),
            work: 0..50,
            think: 1..20,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                let b = pick(&ctx);
                if chance(0.25) {
                    ctx.pause(b);
                    ctx.step(&pool, format_args!("paused b{b}"));
                    sleep(ms(draw(1..800))).await;
                    ctx.resume(b);
                    ctx.step(&pool, format_args!("resumed b{b}"));
                } else {
                    ctx.kill(b);
                    ctx.step(&pool, format_args!("killed b{b}"));
                    sleep(ms(draw(1..500))).await;
                    ctx.restart(b);
                    ctx.step(&pool, format_args!("restarted b{b}"));
                }
                sleep(ms(draw(1..500))).await;
            }
        })
        .await;
    })
    .await
}

async fn connect_storm() -> Outcome {
    let mut setup = Setup::new(6);
    setup.config.max_connections = draw(0..2) as usize * 6; // unlimited or exactly enough
    let info = format!("max_connections={}", setup.config.max_connections);
    world(setup, info, |ctx| async move {
        let traffic = Traffic {
            workers: 30,
            length: ms(3000),
            work: 0..20,
            think: 1..5,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(200..800))).await;
                if chance(0.5) {
                    ctx.reg.manual.store(true, Ordering::SeqCst);
                    pool.clear();
                    ctx.reg.manual.store(false, Ordering::SeqCst);
                    ctx.step(&pool, format_args!("mass eviction (clear)"));
                } else {
                    for b in 0..ctx.brokers.len() {
                        ctx.restart(b);
                    }
                    ctx.step(&pool, format_args!("all brokers restarted"));
                }
            }
        })
        .await;
    })
    .await
}

/// No traffic generator: exact instants. madsim wakes a timer 50 ns after its deadline, so a use
/// made right after waking at `d0` and a sweep made right after waking at `d0 + max_idle + δ` are
/// exactly `max_idle + δ` apart. With δ ∈ {−1 ms, 0, +1 ms}: a connection used exactly `max_idle`
/// ago is still fresh (I5), one used `max_idle + 1 ms` ago goes (I6); a call in flight across the
/// edge keeps it (I5); the end of a call moves the clock exactly. A bare `get` reads no clock: it
/// marks the connection used, and the next sweep folds the mark in at its own instant, so the
/// connection is never evicted within `max_idle` of the `get` (I5) and goes `max_idle` after that
/// sweep (I6: late by at most the time from the `get` to the next sweep).
async fn idle_edge() -> Outcome {
    let mut setup = Setup::new(2);
    let max_idle = ms(draw(2..3000));
    setup.config.max_idle = Some(max_idle);
    setup.cleanup = None;
    setup.call_timeout = max_idle * 3 + ms(100);
    let info = format!("max_idle={max_idle:?}");
    world(setup, info, move |ctx| async move {
        let pool = ctx.pool();
        let addr = ctx.brokers[0].addr.clone();
        for round in 0..6 {
            if ctx.get_or_connect(&pool, &addr).await.is_err() {
                ctx.rec.fail("SIM", "no connection without faults");
                return;
            }
            let d0 = Instant::now() + ms(draw(1..20));
            tokio::time::sleep_until(d0).await;
            // `peek`, not `get`: the use whose edge is tested is the call below, exact.
            let Some(conn) = pool.peek(&addr) else {
                ctx.rec.fail("I6", "a connection used within max_idle is gone");
                return;
            };
            conn.client().touch();
            let used_at = Instant::now();
            let across = round % 2 == 1;
            let call = across.then(|| {
                conn.client().call_started();
                conn.begin()
            });
            if !across {
                // A call that ends at once: an exact use (the `get` alone is folded in later).
                conn.begin().success();
            }
            let offset = draw(0..3);
            tokio::time::sleep_until(d0 + max_idle + ms(offset) - ms(1)).await;
            let since = used_at.elapsed();
            let evicted = pool.evict_idle().await;
            ctx.step(&pool, format_args!("idle sweep {since:?} after the use"));
            let should_go = !across && since > max_idle;
            if should_go != (evicted == 1) {
                ctx.rec.fail(
                    if should_go { "I6" } else { "I5" },
                    format!(
                        "used at t0, swept at t0+{since:?} (max_idle {max_idle:?}, call in flight: {across}): evicted {evicted}"
                    ),
                );
            }
            if let Some(call) = call {
                let d1 = Instant::now() + ms(draw(1..20));
                tokio::time::sleep_until(d1).await;
                call.success();
                conn.client().call_ended();
                let ended = Instant::now();
                tokio::time::sleep_until(d1 + max_idle).await;
                if pool.evict_idle().await != 0 {
                    ctx.rec.fail("I5", format!("evicted {:?} after its call ended (max_idle {max_idle:?})", ended.elapsed()));
                }
                tokio::time::sleep_until(d1 + max_idle + ms(1)).await;
                if pool.evict_idle().await != 1 {
                    ctx.rec.fail("I6", format!("not evicted {:?} after its call ended (max_idle {max_idle:?})", ended.elapsed()));
                }
            } else if evicted == 0 {
                // A get marks the connection: fresh for max_idle after the sweep that folds it in
                // (here at d1 + max_idle), never evicted earlier (I5), gone after (I6).
                let d1 = Instant::now() + ms(draw(1..20));
                tokio::time::sleep_until(d1).await;
                match pool.get(&addr) {
                    Some(c) => c.client().touch(),
                    None => ctx.rec.fail("I6", "a fresh connection is gone"),
                }
                let got = Instant::now();
                tokio::time::sleep_until(d1 + max_idle).await;
                if pool.evict_idle().await != 0 {
                    ctx.rec.fail("I5", format!("evicted {:?} after a get (max_idle {max_idle:?})", got.elapsed()));
                }
                tokio::time::sleep_until(d1 + max_idle + ms(1)).await;
                if pool.evict_idle().await != 0 {
                    ctx.rec.fail("I5", format!("evicted {:?} after a get, within max_idle of the sweep that folded it in (max_idle {max_idle:?})", got.elapsed()));
                }
                tokio::time::sleep_until(d1 + 2 * max_idle + ms(1)).await;
                if pool.evict_idle().await != 1 {
                    ctx.rec.fail("I6", format!("not evicted {:?} after a get, past max_idle after the sweep that folded it in (max_idle {max_idle:?})", got.elapsed()));
                }
            }
            drop(conn);
            ctx.step(&pool, format_args!("round {round} done"));
        }
        let cleanup = ctx.start_cleanup(&pool);
        ctx.liveness(&pool, &[0, 1]).await;
        ctx.quiesce(&pool, cleanup).await;
    })
    .await
}

async fn capacity() -> Outcome {
    let mut setup = Setup::new(12);
    setup.config.max_connections = draw(1..5) as usize;
    setup.config.when_full = WhenFull::EvictLeastRecentlyUsed;
    let info = format!("max_connections={}", setup.config.max_connections);
    world(setup, info, |ctx| async move {
        let traffic = Traffic {
            workers: 8,
            length: ms(4000),
            work: 0..50,
            think: 1..10,
        };
        standard(ctx, traffic, |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(50..400))).await;
                let b = pick(&ctx);
                ctx.restart(b);
                ctx.step(&pool, format_args!("restarted b{b}"));
            }
        })
        .await;
    })
    .await
}

async fn cleanup_race() -> Outcome {
    let mut setup = Setup::new(3);
    let max_idle = ms(draw(1..10));
    setup.config.max_idle = Some(max_idle);
    setup.cleanup = Some(ms(1));
    let info = format!("max_idle={max_idle:?}");
    world(setup, info, |ctx| async move {
        let pool = ctx.pool();
        let cleanup = ctx.start_cleanup(&pool);
        let monitor = ctx.monitor(&pool, ms(1));
        let until = Instant::now() + ms(2000);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let ctx = Arc::clone(&ctx);
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    let b = pick(&ctx);
                    let addr = ctx.brokers[b].addr.clone();
                    match draw(0..6) {
                        0 => {
                            if let Some(conn) = pool.get(&addr) {
                                ctx.check_handed_out(&conn);
                                conn.client().touch();
                                let _ = ctx.call(&conn, 1, draw(0..5) as u32).await;
                            }
                        }
                        1 | 2 => {
                            if let Ok(conn) = ctx.get_or_connect(&pool, &addr).await
                                && let Err(CallError::Broken | CallError::Closed) =
                                    ctx.call(&conn, 1, draw(0..5) as u32).await
                            {
                                ctx.remove_stale(&pool, &conn);
                            }
                        }
                        3 => {
                            // insert by hand; I2: re-inserting a present address never fails
                            // for capacity and never changes the count.
                            // Judged at the connector: the old connection is closed and the
                            // new one open, so the count open there is unchanged.
                            if let Ok(conn) = pool.connector().connect_by_hand(addr.as_str()).await
                            {
                                let book = Arc::clone(&conn.book);
                                let present = pool.peek(&addr);
                                // Open at the connector before, the new connection not counted.
                                let open = ctx.reg.open() - 1;
                                ctx.reg.manual.store(true, Ordering::SeqCst);
                                let ok = pool.insert(addr.clone(), conn);
                                ctx.reg.manual.store(false, Ordering::SeqCst);
                                if ok {
                                    book.pooled.store(true, Ordering::SeqCst);
                                }
                                if let Some(old) = present
                                    && (!ok
                                        || ctx.reg.open() != open
                                        || !old.client().closed_by_pool())
                                {
                                    ctx.rec.fail(
                                        "I2",
                                        format!(
                                            "re-insert of {addr}: ok={ok}, open at the connector \
                                             {open} -> {}, the old connection s{} closed: {}",
                                            ctx.reg.open(),
                                            old.client().serial(),
                                            old.client().closed_by_pool()
                                        ),
                                    );
                                }
                                ctx.step(&pool, format_args!("inserted {addr}"));
                            }
                        }
                        4 => {
                            if let Some(conn) = pool.take_unclosed(&addr) {
                                // The caller owns it now; close it as the pool would.
                                ctx.reg.manual.store(true, Ordering::SeqCst);
                                keyed_pool::Connector::close(pool.connector(), conn.client());
                                ctx.reg.manual.store(false, Ordering::SeqCst);
                                ctx.step(&pool, format_args!("removed {addr}"));
                            }
                        }
                        _ => {
                            let swept = pool.evict_idle().await + pool.evict_unhealthy().await;
                            ctx.step(&pool, format_args!("manual sweep {swept}"));
                        }
                    }
                    sleep(ms(draw(0..4).max(1))).await;
                }
            }));
        }
        ctx.join("racer", tasks, ms(2000 + 1000)).await;
        ctx.liveness(&pool, &[0, 1, 2]).await;
        ctx.quiesce(&pool, cleanup).await;
        let _ = monitor.await;
    })
    .await
}

/// Traffic, then `close()` at a random instant: `close` ends promptly, every worker ends (they
/// see `Closed`), the cleanup task ends, every connection is closed at the connector and, once the
/// last handle is gone, at every broker (I17).
async fn close_mid_traffic() -> Outcome {
    world(Setup::new(3), String::new(), |ctx| async move {
        let pool = ctx.pool();
        let cleanup = ctx.start_cleanup(&pool);
        let until = Instant::now() + ms(5000);
        let targets = [0, 1, 2];
        let workers = ctx.workers(&pool, 8, &targets, until, 0..100, 1..10);
        sleep(ms(draw(1..2000))).await;
        if chance(0.5) {
            ctx.restart(pick(&ctx));
        }
        sleep(ms(draw(0..50))).await;
        ctx.step(&pool, format_args!("closing"));
        ctx.reg.manual.store(true, Ordering::SeqCst);
        let started = Instant::now();
        pool.close().await;
        if started.elapsed() > ms(1) {
            ctx.rec
                .fail("I16", format!("close() took {:?}", started.elapsed()));
        }
        // I17 at the connector: nothing the pool made is open once close() has returned, and
        // stays so: a connect in flight at the close closes its connection as it lands. (The
        // pool's own `len()` is the API's report of it.)
        if ctx.reg.open() != 0 || !pool.is_empty() {
            ctx.rec.fail(
                "I17",
                format!(
                    "after close(): {} open at the connector, {} still pooled",
                    ctx.reg.open(),
                    pool.len()
                ),
            );
        }
        let watch = {
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                let until = Instant::now() + ctx.setup.config.connect_timeout + ms(20);
                while Instant::now() < until {
                    if ctx.reg.open() != 0 {
                        ctx.rec.fail(
                            "I17",
                            format!(
                                "{} connection(s) open at the connector after close() returned",
                                ctx.reg.open()
                            ),
                        );
                        return;
                    }
                    sleep(ms(1)).await;
                }
            })
        };
        match ctx.get_or_connect(&pool, &ctx.brokers[0].addr).await {
            Err(PoolError::Closed) => {}
            other => ctx.rec.fail(
                "I17",
                format!("get_or_connect after close: {:?}", other.map(|c| c.id())),
            ),
        }
        // An insert after close is refused, and what it brought is not kept open.
        if let Ok(conn) = pool
            .connector()
            .connect_by_hand(ctx.brokers[1].addr.as_str())
            .await
        {
            let book = Arc::clone(&conn.book);
            if pool.insert(ctx.brokers[1].addr.clone(), conn) {
                book.pooled.store(true, Ordering::SeqCst);
                ctx.rec.fail("I17", "insert after close() was accepted");
            }
        }
        let bound = ctx.setup.config.connect_timeout + ctx.setup.call_timeout + ms(20);
        ctx.join("worker", workers, bound).await;
        if let Some(task) = cleanup
            && tokio::time::timeout(ms(1), task).await.is_err()
        {
            ctx.rec
                .fail("I17", "the cleanup task still runs after close()");
        }
        let _ = watch.await;
        // Connects in flight at close() finish and close their connection.
        sleep(ctx.setup.config.connect_timeout + Duration::from_secs(11)).await;
        ctx.agree(&pool);
        for b in &ctx.brokers {
            if b.state.open() != 0 {
                ctx.rec.fail(
                    "I17",
                    format!(
                        "{} still sees {} open connection(s) after close()",
                        b.addr,
                        b.state.open()
                    ),
                );
            }
        }
    })
    .await
}

/// Traffic, then every task using the pool is cancelled and the last handle dropped: the cleanup
/// task ends and every connection closes, at the connector and at the brokers (I17).
async fn drop_mid_traffic() -> Outcome {
    world(Setup::new(3), String::new(), |ctx| async move {
        let pool = ctx.pool();
        let cleanup = ctx.start_cleanup(&pool).expect("setup has a cleanup task");
        let until = Instant::now() + ms(5000);
        let workers = ctx.workers(&pool, 8, &[0, 1, 2], until, 0..100, 1..10);
        sleep(ms(draw(1..2000))).await;
        ctx.step(&pool, format_args!("dropping"));
        ctx.reg.manual.store(true, Ordering::SeqCst);
        for w in &workers {
            w.abort();
        }
        for w in workers {
            let _ = w.await;
        }
        drop(pool);
        // A connect in flight holds the pool until it ends (at most one connect timeout).
        let bound = ctx.setup.config.connect_timeout + ms(100);
        if tokio::time::timeout(bound, cleanup).await.is_err() {
            ctx.rec.fail(
                "I17",
                format!("the cleanup task still runs {bound:?} after the pool was dropped"),
            );
        }
        sleep(Duration::from_secs(11)).await;
        if ctx.reg.live() != 0 || ctx.reg.open() != 0 {
            ctx.rec.fail(
                "I17",
                format!(
                    "{} connection(s) still exist ({} open at the connector) after the pool was \
                     dropped",
                    ctx.reg.live(),
                    ctx.reg.open()
                ),
            );
        }
        for b in &ctx.brokers {
            if b.state.open() != 0 {
                ctx.rec.fail(
                    "I17",
                    format!(
                        "{} still sees {} open connection(s) after the pool was dropped",
                        b.addr,
                        b.state.open()
                    ),
                );
            }
        }
    })
    .await
}

/// The most connects a schedule allows in `span` (lower bound of every delay: no jitter up).
fn max_connects(policy: &BackoffPolicy, span: Duration) -> u64 {
    let mut t = Duration::ZERO;
    let mut n = 1; // the first connect needs no wait
    for k in 1.. {
        t += policy.delay(k, 0.0);
        if t > span {
            break;
        }
        n += 1;
    }
    n
}

async fn dead_broker() -> Outcome {
    let mut setup = Setup::new(2);
    setup.config.backoff = BackoffPolicy {
        base: ms(draw(10..200)),
        max: ms(draw(500..3000)),
        jitter: draw(0..50) as f64 / 100.0,
        ..BackoffPolicy::default()
    };
    let info = format!("backoff={:?}", setup.config.backoff);
    world(setup, info, |ctx| async move {
        ctx.kill(0);
        let started = Instant::now();
        let dead = ctx.brokers[0].addr.clone();
        let traffic = Traffic { workers: 4, length: ms(20_000), work: 0..10, think: 1..5 };
        standard(ctx, traffic, move |ctx, pool, until| async move {
            tokio::time::sleep_until(until).await;
            let span = started.elapsed();
            let connects = ctx.reg.connects_to(dead.as_str());
            let allowed = max_connects(&ctx.setup.config.backoff, span);
            if connects > allowed {
                ctx.rec.fail("I12", format!("{connects} connects to a dead broker in {span:?}; the backoff schedule allows {allowed}"));
            }
            ctx.step(&pool, format_args!("{connects} connects to the dead broker (allowed {allowed})"));
        })
        .await;
    })
    .await
}

async fn swarm() -> Outcome {
    let brokers = draw(1..7) as usize;
    let mut setup = Setup::new(brokers);
    let c = &mut setup.config;
    c.max_connections = if chance(0.5) {
        0
    } else {
        draw(1..brokers as u64 + 3) as usize
    };
    c.when_full = if c.max_connections != 0 && (c.max_connections < brokers || chance(0.5)) {
        WhenFull::EvictLeastRecentlyUsed
    } else {
        WhenFull::Reject
    };
    c.max_idle = if chance(0.2) {
        None
    } else {
        Some(ms(draw(5..2000)))
    };
    c.health.consecutive_failures = draw(0..8) as u32;
    c.health.failure_ratio = draw(10..101) as f64 / 100.0;
    c.health.window = ms(draw(10..3000));
    c.health.min_requests = draw(1..30) as u32;
    let base = draw(1..300);
    c.backoff = BackoffPolicy {
        base: ms(base),
        max: ms(base + draw(0..3000)),
        jitter: draw(0..90) as f64 / 100.0,
        ..BackoffPolicy::default()
    };
    c.connect_timeout = ms(draw(20..1500));
    setup.cleanup = if chance(0.1) {
        None
    } else {
        Some(ms(draw(1..500)))
    };
    setup.call_timeout = ms(draw(20..1500));
    let workers = draw(1..16) as usize;
    let length = ms(draw(1000..8000));
    let fault_rate = draw(0..100);
    let info = format!(
        "brokers={brokers} workers={workers} traffic={length:?} fault_gap<={fault_rate}0ms cleanup={:?} call_timeout={:?} config={:?}",
        setup.cleanup, setup.call_timeout, setup.config
    );
    world(setup, info, move |ctx| async move {
        let traffic = Traffic {
            workers,
            length,
            work: 0..draw(1..300),
            think: 1..draw(2..50),
        };
        standard(ctx, traffic, move |ctx, pool, until| async move {
            while Instant::now() < until {
                sleep(ms(draw(1..fault_rate * 10 + 2))).await;
                let b = pick(&ctx);
                match draw(0..10) {
                    0 => ctx.restart(b),
                    1 => ctx.kill(b),
                    2 => ctx.pause(b),
                    3 => ctx.clog(b),
                    4 => ctx.clog_one_way(b, chance(0.5)),
                    5 => ctx.slow(b, ms(draw(0..2000))),
                    6 => ctx.errors(b, draw(0..1000) as u32),
                    7 => ctx.net(draw(0..40) as f64 / 100.0, ms(1)..ms(draw(2..100))),
                    8 => {
                        ctx.reg.manual.store(true, Ordering::SeqCst);
                        pool.clear();
                        ctx.reg.manual.store(false, Ordering::SeqCst);
                    }
                    _ => ctx.faults_off().await,
                }
                ctx.step(&pool, format_args!("swarm fault"));
            }
        })
        .await;
    })
    .await
}

/// A backoff schedule drawn from the seed for the ejection scenarios: short enough that a run
/// climbs it to its cap.
fn ejection_backoff() -> BackoffPolicy {
    BackoffPolicy {
        base: ms(draw(20..200)),
        max: ms(draw(1000..4000)),
        jitter: draw(0..50) as f64 / 100.0,
        ..BackoffPolicy::default()
    }
}

/// The director of the ejection scenarios: every 250 ms the pool's `ejection_count` of both
/// brokers is checked against the books (I12); once, at a random instant, if `mark_up`, the
/// failing broker is marked up (its backoff must end at once, its count go to 0).
async fn ejection_director(ctx: Arc<Ctx>, pool: Pool, until: Instant, mark_up: bool) {
    let bad = ctx.brokers[0].addr.clone();
    let good = ctx.brokers[1].addr.clone();
    let mark_at = Instant::now() + ms(draw(5000..15_000));
    let mut marked = !mark_up;
    while Instant::now() < until {
        sleep(ms(250)).await;
        ctx.check_ejections(&pool, &bad);
        ctx.check_ejections(&pool, &good);
        if !marked && Instant::now() >= mark_at {
            marked = true;
            ctx.mark_up(&pool, &bad).await;
            ctx.step(&pool, format_args!("mark_up({bad})"));
        }
    }
    ctx.step(
        &pool,
        format_args!(
            "{} accepts at {bad}, {} connects, ejection count {} (books: at least {})",
            ctx.brokers[0].state.accepted.load(Ordering::SeqCst),
            ctx.reg.connects_to(bad.as_str()),
            pool.ejection_count(&bad),
            ctx.reg.k_lower(bad.as_str())
        ),
    );
}

/// A broker that accepts every connection and closes it at once (a load balancer in front of a
/// dead broker), next to a healthy one, for 20 s of traffic. Without a handshake the connect is
/// the TCP connect alone and succeeds; with one, the broker answers the handshake and then closes.
/// Either way every connection dies within `short_lived` of being made, so each is an ejection
/// (issue 11): each connect waits at least `delay(k, no jitter)` after the k-th (I12, at the
/// connector and between the broker's accepts), `ejection_count` follows the books, `mark_up`
/// ends the backoff at once; then liveness, and the decay phase: the count decays to 0 and the
/// pool tracks only live addresses (I12, I18).
async fn accept_then_close() -> Outcome {
    let mut setup = Setup::new(2);
    setup.config.backoff = ejection_backoff();
    let handshake = chance(0.5);
    let mark_up = chance(0.5);
    let info = format!(
        "handshake={handshake} mark_up={mark_up} backoff={:?}",
        setup.config.backoff
    );
    world(setup, info, move |ctx| async move {
        ctx.tidy.store(false, Ordering::SeqCst);
        ctx.reg.handshake.store(handshake, Ordering::SeqCst);
        ctx.brokers[0].state.set_close_mode(if handshake {
            CloseMode::AfterHandshake
        } else {
            CloseMode::AtAccept
        });
        let traffic = Traffic {
            workers: 4,
            length: ms(20_000),
            work: 0..10,
            think: 1..10,
        };
        standard_with(
            ctx,
            traffic,
            move |ctx, pool, until| ejection_director(ctx, pool, until, mark_up),
            true,
        )
        .await;
    })
    .await
}

/// A broker that accepts connections, answers the handshake, and fails every request (an
/// application error on a healthy transport), next to a healthy one. Each connection is judged
/// unhealthy after `consecutive_failures` calls and evicted: an ejection, and a successful connect
/// does not reset the count (issue 11), so the gaps between connects grow to the cap (I12, at the
/// connector and between the broker's accepts); `ejection_count`, `mark_up`, liveness and the decay
/// phase as in `accept-then-close`.
async fn fail_every_request() -> Outcome {
    let mut setup = Setup::new(2);
    setup.config.backoff = ejection_backoff();
    setup.config.health.consecutive_failures = draw(1..6) as u32;
    let mark_up = chance(0.5);
    let info = format!(
        "consecutive_failures={} mark_up={mark_up} backoff={:?}",
        setup.config.health.consecutive_failures, setup.config.backoff
    );
    world(setup, info, move |ctx| async move {
        ctx.tidy.store(false, Ordering::SeqCst);
        ctx.errors(0, 1000);
        let traffic = Traffic {
            workers: 4,
            length: ms(20_000),
            work: 0..10,
            think: 1..10,
        };
        standard_with(
            ctx,
            traffic,
            move |ctx, pool, until| ejection_director(ctx, pool, until, mark_up),
            true,
        )
        .await;
    })
    .await
}

/// Rounds of `silent-between-uses`, per pool.
const SILENT_ROUNDS: usize = 3;

/// Servers that die silently between uses (deadpool #191, hyper #2136): each round, traffic to
/// two brokers, then a quiet spell in which one of them hangs (paused: its connections stay open
/// and nothing answers), then one call to each. Run twice in one world, on disjoint brokers: a
/// pool without probing (brokers 0, 1), then one whose cleanup task probes connections quiet
/// longer than `probe_idle` (brokers 2, 3).
///
/// Judged from the calls the scenario makes: without probing, every round's call to the hung
/// broker goes out on its dead connection and times out; with probing, none does (the probe finds
/// the connection first, the pool evicts it and backs the address off, and the caller gets an
/// error from `get_or_connect` at once instead of a call that hangs). Every other check of the
/// world runs throughout: the probes do not move the client's idle clock, so the close audit (I5)
/// and I6 judge connections by their calls; a probe left unanswered condemns its connection in
/// the books, so the unhealthy eviction it causes is an ejection they account for (I9, I12); the
/// probes' outcomes are in the books' per-connection counts (I13).
async fn silent_between_uses() -> Outcome {
    let mut setup = Setup::new(4);
    // Long enough that the quiet spells never make a connection idle: the dead one is still
    // pooled when the calls come back, which is the case probing is for.
    setup.config.max_idle = Some(Duration::from_secs(10));
    setup.config.probe_timeout = Some(ms(200));
    let probe_idle = ms(draw(500..1500));
    let quiet = probe_idle * 2 + ms(draw(1000..3000));
    let info = format!("probe_idle={probe_idle:?} quiet={quiet:?}");
    world(setup, info, move |ctx| async move {
        ctx.tidy.store(false, Ordering::SeqCst);
        let plain = ctx.pool();
        let without = silent_phase(&ctx, plain, [0, 1], quiet).await;
        let mut config = ctx.setup.config.clone();
        config.probe_idle = Some(probe_idle);
        let probing = keyed_pool::ConnectionPool::builder()
            .config(config)
            .connector(crate::client::SimConnector {
                reg: Arc::clone(&ctx.reg),
            })
            .build()
            .expect("valid probing config");
        let with = silent_phase(&ctx, probing, [2, 3], quiet).await;
        trace!(
            ctx.rec,
            "calls on dead connections: {without} without probing, {with} with"
        );
        if with != 0 {
            ctx.rec.fail(
                "SIM",
                format!("with probing, {with} call(s) went out on a connection to a hung broker"),
            );
        }
        if without < SILENT_ROUNDS as u64 {
            ctx.rec.fail(
                "SIM",
                format!(
                    "without probing, only {without} call(s) in {SILENT_ROUNDS} rounds hit a hung \
                     broker's connection: the comparison shows nothing"
                ),
            );
        }
    })
    .await
}

/// One pool's run of `silent-between-uses`: returns the calls that failed (every call here is a
/// ping, so a failure is a call on a dead connection). Ends with the liveness phase, quiescence
/// and `close` (the next phase's pool is judged by the same books).
async fn silent_phase(ctx: &Arc<Ctx>, pool: Pool, targets: [usize; 2], quiet: Duration) -> u64 {
    ctx.stop.store(false, Ordering::SeqCst);
    let cleanup = ctx.start_cleanup(&pool);
    let monitor = ctx.monitor(&pool, ms(5));
    let mut failed_calls = 0;
    for round in 0..SILENT_ROUNDS {
        // Traffic until each target has answered a call (a target may still be backing off from
        // the previous round).
        for &b in &targets {
            let addr = &ctx.brokers[b].addr;
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until {
                if let Ok(conn) = ctx.get_or_connect(&pool, addr).await
                    && ctx.call(&conn, 0, 0).await.is_ok()
                {
                    break;
                }
                sleep(ms(20)).await;
            }
        }
        ctx.step(&pool, format_args!("round {round}: traffic done"));
        // The quiet spell: one target hangs early in it.
        let victim = targets[draw(0..2) as usize];
        let hang_at = ms(draw(50..400));
        sleep(hang_at).await;
        ctx.pause(victim);
        sleep(quiet - hang_at).await;
        ctx.step(
            &pool,
            format_args!("round {round}: quiet spell over, b{victim} hung"),
        );
        // The calls come back: one to each target.
        for &b in &targets {
            let addr = &ctx.brokers[b].addr;
            if let Ok(conn) = ctx.get_or_connect(&pool, addr).await
                && ctx.call(&conn, 0, 0).await.is_err()
            {
                failed_calls += 1;
            }
        }
        ctx.resume(victim);
        sleep(ms(500)).await;
        ctx.step(&pool, format_args!("round {round}: b{victim} back"));
    }
    let targets = targets.to_vec();
    ctx.liveness(&pool, &targets).await;
    ctx.quiesce(&pool, cleanup).await;
    let _ = monitor.await;
    ctx.reg.manual.store(true, Ordering::SeqCst);
    pool.close().await;
    ctx.reg.manual.store(false, Ordering::SeqCst);
    ctx.forget_calls();
    failed_calls
}

/// Addresses in `churning-addresses`.
pub const CHURN_ADDRESSES: u64 = 100_000;

/// Over how long the churning addresses are tried (about 1,700 a second).
const CHURN_SPAN: Duration = Duration::from_secs(60);

/// Seeds of `churning-addresses` when the whole suite runs: each covers about 105 s of virtual
/// time and 100,000 connects, about 2.5 s of CPU (the other scenarios take 5-200 ms a seed).
pub const CHURN_SEED_CAP: u64 = 8;

/// The `i`-th churning address: alternately a host that does not exist and a broker's host with
/// nothing listening on the port; all distinct, all refused.
fn churn_addr(i: u64) -> CheetahString {
    let j = i / 2;
    if i.is_multiple_of(2) {
        format!("10.200.{}.{}:{}", (j >> 8) & 255, j & 255, 7000 + (j >> 16))
    } else {
        format!("10.0.0.{}:{}", 1 + j % 2, 10_000 + j / 2)
    }
    .into()
}

/// 100,000 addresses that each fail once (connect refused) and are never used again, tried over
/// 60 s by a few dozen tasks, with the cleanup task running and light traffic on two healthy
/// brokers. I18: at every sample the pool tracks no more addresses than the books allow (live ones
/// plus those whose backoff, with full jitter, and one decay interval per failure may not have
/// passed yet, one sweep later), so its state is bounded by the churn rate, not the churn total;
/// once no churned address may still be tracked, the pool tracks exactly the live addresses, and
/// every sampled churned address's `ejection_count` is back to 0 (I12). Also: each failure counts
/// one ejection at once (sampled, I12), and the usual liveness and quiescence.
async fn churning_addresses() -> Outcome {
    let mut setup = Setup::new(2);
    let interval = ms(draw(100..1000));
    setup.cleanup = Some(interval);
    setup.config.backoff = BackoffPolicy {
        base: ms(draw(100..1000)),
        max: ms(draw(2000..10_000)),
        jitter: 0.2,
        ..BackoffPolicy::default()
    };
    let tasks = draw(8..64);
    let info = format!(
        "addresses={CHURN_ADDRESSES} over {CHURN_SPAN:?} tasks={tasks} cleanup={interval:?} backoff={:?}",
        setup.config.backoff
    );
    world(setup, info, move |ctx| async move {
        let pool = ctx.pool();
        let cleanup = ctx.start_cleanup(&pool);
        // Every 2 s: `tracked_addresses()` may cost O(addresses) (it does at 0238a86, and then
        // dominates the run's time).
        let monitor = ctx.monitor(&pool, ms(2000));
        let start = Instant::now();
        let churn_end = start + CHURN_SPAN;
        let workers = ctx.workers(&pool, 2, &[0, 1], churn_end, 0..5, 10..100);
        let next = Arc::new(AtomicU64::new(0));
        let sampled = Arc::new(StdMutex::new(Vec::new()));
        let mut churners = Vec::new();
        for _ in 0..tasks {
            let (ctx, pool) = (Arc::clone(&ctx), pool.clone());
            let (next, sampled) = (Arc::clone(&next), Arc::clone(&sampled));
            churners.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= CHURN_ADDRESSES {
                        break;
                    }
                    let at = start + CHURN_SPAN.mul_f64(i as f64 / CHURN_ADDRESSES as f64);
                    tokio::time::sleep_until(at).await;
                    let addr = churn_addr(i);
                    match ctx.get_or_connect(&pool, &addr).await {
                        Err(PoolError::Connect { .. } | PoolError::ConnectTimeout { .. }) => {}
                        Ok(conn) => ctx.rec.fail(
                            "SIM",
                            format!("{addr} answered ({}): nothing listens there", conn.id()),
                        ),
                        Err(err) => ctx.rec.fail(
                            "SIM",
                            format!("the first connect to {addr} did not fail as refused: {err}"),
                        ),
                    }
                    if i.is_multiple_of(997) {
                        // Each failed connect is an ejection, counted at once.
                        ctx.check_ejections(&pool, &addr);
                        sampled.lock().expect("sampled lock").push(addr);
                    }
                }
            }));
        }
        ctx.join("churn", churners, CHURN_SPAN + Duration::from_secs(10))
            .await;
        ctx.step(
            &pool,
            format_args!("churn over: {} connects", ctx.reg.connects()),
        );
        // Until the books say no churned address may still be tracked.
        let b = ctx.setup.config.backoff;
        let drain = b.delay(1, 1.0) + decay_interval() + interval * 2 + Duration::from_secs(2);
        let drain_until = Instant::now() + drain;
        while ctx
            .reg
            .tracked_bound()
            .is_some_and(|(_, pending)| pending > 0)
        {
            if Instant::now() > drain_until {
                ctx.rec.fail(
                    "SIM",
                    format!(
                        "the books still count addresses {drain:?} after the churn: {}",
                        ctx.reg.pending_sample()
                    ),
                );
                break;
            }
            sleep(Duration::from_secs(1)).await;
        }
        ctx.join("worker", workers, Duration::from_secs(5)).await;
        ctx.step(&pool, format_args!("churned addresses expired"));
        ctx.check_tracked_exact(&pool);
        for addr in sampled.lock().expect("sampled lock").iter() {
            let k = pool.ejection_count(addr);
            if k != 0 {
                ctx.rec.fail(
                    "I12",
                    format!(
                        "ejection_count({addr}) = {k} after its backoff and {:?} \
                         without failure: one failure must have decayed",
                        decay_interval()
                    ),
                );
            }
        }
        ctx.liveness(&pool, &[0, 1]).await;
        ctx.quiesce(&pool, cleanup).await;
        let _ = monitor.await;
    })
    .await
}

/// Each connection `call-api` called on, with what its calls returned.
type CallBooks = StdMutex<Vec<(PooledConnection<SimConn>, CallBook)>>;

/// What the calls of `call-api` saw on one connection, as the call API must have recorded it.
#[derive(Default)]
struct CallBook {
    successes: u64,
    failures: u64,
    cancelled: u64,
}

/// `pool.call` (issue 14) with the pool's call timeout, against brokers made slow (past the
/// timeout, or not) and failing part of their requests with an application error, at random.
/// Workers call through `ConnectionPool::call`, counting a broker's error answer as a success of
/// the transport (`failure_if`), and some callers give up mid-call. Judged: every call ends by
/// its bound, and a timed-out one exactly at its timeout (I16); each connection's metrics equal
/// what its calls returned, as classified (a timeout is a failure, a dropped call cancelled, a
/// call that got no connection nothing: I13); a connection the calls judged unhealthy is closed
/// by the next sweep (I9, from the books); the usual liveness and quiescence.
///
/// Shared mode with several connections per address (issue 13): `max_per_address` is 1–3 and
/// `busy_in_flight` 1–2, so slow brokers make the pool open more connections to them; the
/// connector's books hold every address to `max_per_address` connections open plus connecting at
/// every connect (I23), and the per-connection books above judge each of them.
async fn call_api() -> Outcome {
    let mut setup = Setup::new(3);
    let timeout_ms = draw(50..300);
    let call_timeout = ms(timeout_ms);
    setup.config.call_timeout = Some(call_timeout);
    setup.config.health.consecutive_failures = draw(2..6) as u32;
    let per_address = draw(1..4) as usize;
    setup.config.max_per_address = per_address;
    setup.config.busy_in_flight = draw(1..3);
    let info = format!(
        "call_timeout={call_timeout:?} consecutive_failures={} max_per_address={per_address} \
         busy_in_flight={}",
        setup.config.health.consecutive_failures, setup.config.busy_in_flight
    );
    world(setup, info, move |ctx| async move {
        ctx.reg.set_per_address(per_address);
        // No standard workers: the calls here go through the call API only, so the world's
        // model of `ctx.call` never meets these connections.
        let traffic = Traffic {
            workers: 0,
            length: ms(6000),
            work: 0..1,
            think: 1..2,
        };
        standard(ctx, traffic, move |ctx, pool, until| async move {
            let books: Arc<CallBooks> = Arc::default();
            let workers: Vec<_> = (0..6)
                .map(|_| {
                    let (ctx, pool, books) = (Arc::clone(&ctx), pool.clone(), Arc::clone(&books));
                    tokio::spawn(async move {
                        while Instant::now() < until {
                            api_call(&ctx, &pool, &books, timeout_ms).await;
                            sleep(ms(draw(1..20))).await;
                        }
                    })
                })
                .collect();
            while Instant::now() < until {
                let b = pick(&ctx);
                let delay = if chance(0.5) { draw(0..2 * timeout_ms) } else { 0 };
                ctx.slow(b, ms(delay));
                ctx.errors(b, if chance(0.5) { draw(0..1000) as u32 } else { 0 });
                ctx.step(&pool, format_args!("b{b} slowed by {delay} ms"));
                sleep(ms(draw(100..1500))).await;
            }
            for b in 0..ctx.brokers.len() {
                ctx.slow(b, Duration::ZERO);
                ctx.errors(b, 0);
            }
            let bound = ctx.setup.config.connect_timeout + call_timeout + ms(100);
            ctx.join("call-api worker", workers, bound).await;
            // I13: every connection's metrics against its calls.
            let books = std::mem::take(&mut *books.lock().expect("books"));
            for (conn, book) in &books {
                let m = conn.metrics();
                let recorded = (m.success_count(), m.total_errors(), m.cancelled_count());
                if recorded != (book.successes, book.failures, book.cancelled) {
                    ctx.rec.fail(
                        "I13",
                        format!(
                            "{} ({}): recorded ok/failed/cancelled {recorded:?}, its calls returned \
                             {:?}",
                            conn.addr(),
                            conn.id(),
                            (book.successes, book.failures, book.cancelled)
                        ),
                    );
                }
                if m.in_flight() != 0 {
                    ctx.rec
                        .fail("I5", format!("{}: {} calls left in flight", conn.id(), m.in_flight()));
                }
                // Out of the way of the liveness phase, whose model starts each connection at 0.
                if pool.peek(conn.addr()).is_some_and(|p| p.id() == conn.id()) {
                    ctx.remove_stale(&pool, conn);
                }
            }
            ctx.step(&pool, format_args!("call-api books checked"));
        })
        .await;
    })
    .await
}

/// One call through `pool.call` to a random broker, judged and booked.
async fn api_call(ctx: &Arc<Ctx>, pool: &Pool, books: &CallBooks, timeout_ms: u64) {
    /// Ends the call in the connector's books however the call's future ends.
    struct InFlight(PooledConnection<SimConn>);
    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.client().call_ended();
        }
    }
    /// Counts the caller as waiting on its address in the books while the call may connect (as
    /// `Ctx::get_or_connect` does), for the books' bound on tracked addresses (I18).
    struct Waiting<'a>(&'a Ctx, &'a str);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.reg.call_end(self.1);
        }
    }
    let addr = ctx.brokers[pick(ctx)].addr.clone();
    ctx.reg.call_begin(addr.as_str());
    let _waiting = Waiting(ctx, addr.as_str());
    let arg = draw(0..50) as u32;
    // The connection the call ran on, and when it started on it.
    type Used = StdMutex<Option<(PooledConnection<SimConn>, Instant)>>;
    let used: Arc<Used> = Arc::default();
    let slot = Arc::clone(&used);
    let call = pool
        .call(&addr, move |conn| async move {
            *slot.lock().expect("slot") = Some((conn.clone(), Instant::now()));
            conn.client().call_started();
            let _in_flight = InFlight(conn.clone());
            // The pool's call timeout bounds it, not the client's.
            conn.client()
                .call(u8::from(arg > 0), arg, Duration::from_secs(3600))
                .await
        })
        .failure_if(|e| *e != CallError::Remote);
    let started = Instant::now();
    // A fifth of the callers give up, perhaps mid-call.
    let result = if chance(0.2) {
        tokio::time::timeout(ms(draw(1..2 * timeout_ms)), call.into_future())
            .await
            .ok()
    } else {
        Some(call.await)
    };
    let took = started.elapsed();
    let bound = ctx.setup.config.connect_timeout + ms(timeout_ms) + ms(3);
    if took > bound {
        ctx.rec.fail(
            "I16",
            format!("pool.call({addr}) took {took:?}, bound {bound:?}"),
        );
    }
    let used = used.lock().expect("slot").take();
    let Some((conn, call_started)) = used else {
        if let Some(
            Ok(_) | Err(keyed_pool::CallError::Call(_) | keyed_pool::CallError::TimedOut { .. }),
        ) = &result
        {
            ctx.rec.fail(
                "SIM",
                format!("pool.call({addr}) returned {result:?} without running"),
            );
        }
        return;
    };
    let mut books = books.lock().expect("books");
    let index = match books.iter().position(|(c, _)| c.id() == conn.id()) {
        Some(i) => i,
        None => {
            books.push((conn.clone(), CallBook::default()));
            books.len() - 1
        }
    };
    let book = &mut books[index].1;
    match &result {
        None => book.cancelled += 1,
        Some(Ok(())) | Some(Err(keyed_pool::CallError::Call(CallError::Remote))) => {
            book.successes += 1;
        }
        Some(Err(keyed_pool::CallError::Call(_))) => book.failures += 1,
        Some(Err(keyed_pool::CallError::TimedOut { timeout, .. })) => {
            book.failures += 1;
            let ran = call_started.elapsed();
            if ran < *timeout || ran > *timeout + ms(1) {
                ctx.rec.fail(
                    "I16",
                    format!(
                        "a call on {} timed out after {ran:?}, its timeout {timeout:?}",
                        conn.id()
                    ),
                );
            }
        }
        Some(Err(keyed_pool::CallError::Pool(err))) => ctx.rec.fail(
            "SIM",
            format!("pool.call({addr}) ran its call, then returned the pool error {err}"),
        ),
    }
    // I9 from the books: a connection its calls judged unhealthy must be closed by the next sweep.
    if conn
        .metrics()
        .unusable_reason()
        .is_some_and(|why| why != keyed_pool::core::UnhealthyReason::Closed)
    {
        conn.client().condemn();
    }
    trace!(ctx.rec, "api-call {} {result:?}", conn.id());
}
