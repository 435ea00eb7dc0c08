//! The exclusive-checkout queue of one address (`keyed_pool::core::CheckoutQueue`, issue 13) under
//! random sequences of arrivals, connects (made, failed, never started for want of global
//! capacity), returns (kept or discarded), waiters gone, cancellations, deadlines and evictions.
//! The harness keeps its own books of every connection (idle, checked out to whom, closed) and of
//! the line, and checks after every op:
//!
//! - **I19** connections of the address (idle + checked out + connecting) never exceed
//!   `max_per_address`, connects in flight never exceed `max_connecting`;
//! - **I20** no connection is checked out twice, and only an idle one is handed out from idle;
//! - **I21** a connection goes to the oldest caller in line; a caller gets an idle one only when
//!   nobody is in line; nothing idles while someone waits;
//! - **I22** nothing is lost: every connection made is idle, checked out or closed by the caller,
//!   and one handed to a gone waiter reaches the next.
//!
//! Replay a failure with `PROPTEST_RNG_SEED=<seed> cargo test -p keyed-pool-proptests --test
//! checkout_model` (CI fixes the seed); proptest saves the shrunk case in
//! `checkout_model.proptest-regressions`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use keyed_pool::core::{Acquired, CheckoutLimits, CheckoutQueue, Placed, WaiterId};
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// A caller arrives, willing to wait this many ms.
    Arrive(u64),
    /// The oldest counted connect finishes: made, or failed.
    ConnectDone {
        ok: bool,
    },
    /// A counted connect finds no global capacity.
    NoCapacity,
    /// The async layer retries connects (freed capacity, after a discard or failure).
    StartConnect,
    /// The n-th checked-out connection comes back, kept or discarded.
    Return {
        pick: usize,
        keep: bool,
    },
    /// The n-th checked-out connection's holder was a waiter that had gone: the send failed.
    GoneWaiter {
        pick: usize,
    },
    /// The n-th waiter in line gives up.
    Cancel {
        pick: usize,
    },
    /// Time passes (ms) and deadlines fire.
    Advance(u64),
    /// Idle eviction of the least recently used, or of everything idle since a cutoff.
    EvictLru,
    EvictIdleOlderThan(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..500).prop_map(Op::Arrive),
        3 => any::<bool>().prop_map(|ok| Op::ConnectDone { ok }),
        1 => Just(Op::NoCapacity),
        1 => Just(Op::StartConnect),
        4 => (0usize..8, any::<bool>()).prop_map(|(pick, keep)| Op::Return { pick, keep }),
        1 => (0usize..8).prop_map(|pick| Op::GoneWaiter { pick }),
        1 => (0usize..8).prop_map(|pick| Op::Cancel { pick }),
        2 => (0u64..300).prop_map(Op::Advance),
        1 => Just(Op::EvictLru),
        1 => (0u64..300).prop_map(Op::EvictIdleOlderThan),
    ]
}

/// Who holds a checked-out connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// A caller that found it idle.
    Caller,
    Waiter(WaiterId),
}

#[derive(Default)]
struct Books {
    now: Duration,
    next_conn: u32,
    made: u32,
    idle: BTreeSet<u32>,
    out: BTreeMap<u32, Holder>,
    closed: BTreeSet<u32>,
    /// In line, by id (arrival order).
    line: BTreeSet<WaiterId>,
    /// Connects counted by the queue and not yet finished.
    connecting: usize,
}

impl Books {
    fn handed(&mut self, placed: Placed<u32>, ctx: &str) -> Result<(), TestCaseError> {
        match placed {
            Placed::Handed(waiter, conn) => {
                let oldest = self.line.first().copied();
                prop_assert_eq!(
                    Some(waiter),
                    oldest,
                    "I21 ({}): connection {} went to {:?}, not the oldest in line",
                    ctx,
                    conn,
                    waiter
                );
                self.line.remove(&waiter);
                prop_assert!(
                    self.out.insert(conn, Holder::Waiter(waiter)).is_none(),
                    "I20 ({}): connection {} handed while checked out",
                    ctx,
                    conn
                );
                prop_assert!(!self.idle.contains(&conn), "I20 ({ctx}): {conn} also idle");
            }
            Placed::Idle => {}
        }
        Ok(())
    }
}

fn run(limits: CheckoutLimits, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut q = CheckoutQueue::<u32>::new();
    let mut b = Books::default();
    for (step, &op) in ops.iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        // To the queue a connection whose waiter had gone comes back like any kept one.
        let op = match op {
            Op::GoneWaiter { pick } => Op::Return { pick, keep: true },
            op => op,
        };
        match op {
            Op::Arrive(wait) => {
                let deadline = b.now + Duration::from_millis(wait);
                let line_was_empty = b.line.is_empty();
                match q.acquire(deadline, limits) {
                    Acquired::Ready(conn) => {
                        prop_assert!(line_was_empty, "I21 ({ctx}): overtook the line");
                        prop_assert!(b.idle.remove(&conn), "I20 ({ctx}): {conn} was not idle");
                        prop_assert!(b.out.insert(conn, Holder::Caller).is_none());
                    }
                    Acquired::Queued { waiter, connect } => {
                        prop_assert!(
                            b.idle.is_empty() || !line_was_empty,
                            "I21 ({ctx}): queued while {:?} idle and nobody in line",
                            b.idle
                        );
                        prop_assert!(b.line.insert(waiter), "a waiter id reused");
                        b.connecting += usize::from(connect);
                    }
                }
            }
            Op::ConnectDone { ok } if b.connecting > 0 => {
                b.connecting -= 1;
                if ok {
                    let conn = b.next_conn;
                    b.next_conn += 1;
                    b.made += 1;
                    match q.connected(conn, b.now) {
                        Placed::Idle => {
                            prop_assert!(b.line.is_empty(), "I21 ({ctx}): idled while waited for");
                            b.idle.insert(conn);
                        }
                        handed => b.handed(handed, &ctx)?,
                    }
                } else {
                    let failed = q.connect_failed();
                    prop_assert_eq!(
                        failed,
                        b.line.first().copied(),
                        "({}) fails the oldest",
                        ctx
                    );
                    if let Some(w) = failed {
                        b.line.remove(&w);
                    }
                }
            }
            Op::NoCapacity if b.connecting > 0 => {
                b.connecting -= 1;
                q.connect_not_started();
            }
            Op::StartConnect => {
                let started = q.start_connect(limits);
                let expected = b.line.len() > b.connecting
                    && b.idle.len() + b.out.len() + b.connecting < limits.max_per_address
                    && b.connecting < limits.max_connecting;
                prop_assert_eq!(started, expected, "({}) start_connect", ctx);
                b.connecting += usize::from(started);
            }
            Op::Return { pick, keep } if !b.out.is_empty() => {
                let conn = *b.out.keys().nth(pick % b.out.len()).expect("non-empty");
                b.out.remove(&conn);
                match q.release(conn, keep, b.now) {
                    None => {
                        prop_assert!(!keep, "({ctx}) a kept connection was dropped");
                        b.closed.insert(conn);
                    }
                    Some(Placed::Idle) => {
                        prop_assert!(b.line.is_empty(), "I21 ({ctx}): idled while waited for");
                        b.idle.insert(conn);
                    }
                    Some(handed) => b.handed(handed, &ctx)?,
                }
            }
            Op::Cancel { pick } if !b.line.is_empty() => {
                let waiter = *b.line.iter().nth(pick % b.line.len()).expect("non-empty");
                prop_assert!(q.cancel(waiter), "({ctx}) the waiter was in line");
                prop_assert!(!q.cancel(waiter), "({ctx}) cancelled twice");
                b.line.remove(&waiter);
            }
            Op::Advance(ms) => {
                b.now += Duration::from_millis(ms);
                for waiter in q.expire(b.now) {
                    prop_assert!(
                        b.line.remove(&waiter),
                        "({ctx}) expired {waiter:?} not in line"
                    );
                }
            }
            Op::EvictLru => {
                if let Some((conn, _)) = q.take_least_recently_used() {
                    prop_assert!(b.idle.remove(&conn), "I20 ({ctx}): evicted {conn} not idle");
                    b.closed.insert(conn);
                }
            }
            Op::EvictIdleOlderThan(ms) => {
                let cutoff = b.now.saturating_sub(Duration::from_millis(ms));
                for conn in q.take_idle_since(cutoff) {
                    prop_assert!(b.idle.remove(&conn), "I20 ({ctx}): evicted {conn} not idle");
                    b.closed.insert(conn);
                }
            }
            _ => {}
        }
        // The books against the queue's counts, after every op.
        prop_assert_eq!(q.idle(), b.idle.len(), "({}) idle", ctx);
        prop_assert_eq!(q.checked_out(), b.out.len(), "({}) checked out", ctx);
        prop_assert_eq!(q.connecting(), b.connecting, "({}) connecting", ctx);
        prop_assert_eq!(q.waiting(), b.line.len(), "({}) waiting", ctx);
        prop_assert!(
            q.live() <= limits.max_per_address,
            "I19 ({}): {} connections, cap {}",
            ctx,
            q.live(),
            limits.max_per_address
        );
        prop_assert!(
            q.connecting() <= limits.max_connecting,
            "I19 ({ctx}): connects"
        );
        prop_assert!(
            q.idle() == 0 || q.waiting() == 0,
            "I21 ({ctx}): a connection idles while a caller waits"
        );
        let accounted = b.idle.len() + b.out.len() + b.closed.len();
        prop_assert_eq!(
            accounted,
            b.made as usize,
            "I22 ({}): a connection was lost",
            ctx
        );
        for waiter in &b.line {
            prop_assert!(
                !b.out.values().any(|h| *h == Holder::Waiter(*waiter)),
                "I20 ({ctx}): {waiter:?} both holds a connection and waits"
            );
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn i19_to_i22_hold_for_every_sequence(
        max_per_address in 1usize..5,
        max_connecting in 1usize..3,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        run(CheckoutLimits { max_per_address, max_connecting }, &ops)?;
    }
}
