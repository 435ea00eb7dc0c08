//! The inputs shared by both tiers: a [`Scenario`] is a pool configuration ([`Knobs`]) and a
//! sequence of [`Op`]s. Every type derives [`arbitrary::Arbitrary`] (cargo-fuzz decodes its bytes
//! with it) and has a proptest strategy here (proptest shrinks failures to minimal sequences).
//!
//! Every op is valid in every state: handles and calls are chosen by index modulo what exists, and
//! an op with nothing to act on does nothing. So any byte string is a scenario, and shrinking can
//! drop any op.

use std::time::Duration;

use arbitrary::Arbitrary;
use keyed_pool::CheetahString;
use proptest::prelude::*;

/// Addresses the ops choose from: few, so that ops collide on them.
pub const ADDRS: u8 = 6;

/// The address with index `i` (taken modulo [`ADDRS`]). String order equals index order, so the
/// pool's sorted sweeps and the model agree on the order of addresses.
pub fn addr(i: u8) -> CheetahString {
    format!("10.0.0.{}:7000", i % ADDRS).into()
}

/// Which side of an edge an [`Step`] lands on: 1 ms before, exactly at, or 1 ms after.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// 1 ms before the edge.
    Before,
    /// Exactly at the edge.
    At,
    /// 1 ms after the edge.
    After,
}

impl Edge {
    /// `edge` moved to this side, never below zero.
    pub fn apply(self, edge: Duration) -> Duration {
        const MS: Duration = Duration::from_millis(1);
        match self {
            Edge::Before => edge.saturating_sub(MS),
            Edge::At => edge,
            Edge::After => edge + MS,
        }
    }
}

/// How far virtual time moves in one [`Op::Advance`].
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// That many milliseconds.
    Millis(u16),
    /// `max_idle` (about the edge), or nothing when idle eviction is off.
    MaxIdle(Edge),
    /// One connect timeout.
    ConnectTimeout,
    /// One bucket of the health window (`window / 8`).
    WindowBucket,
    /// To the end of the backoff of an address (about the edge); nothing if it is not backing off.
    Backoff {
        /// Address index.
        addr: u8,
        /// Which side of the deadline.
        edge: Edge,
    },
    /// To the next step of the ejection count's decay of an address (about the edge); nothing if
    /// its count is zero.
    Decay {
        /// Address index.
        addr: u8,
        /// Which side of the step.
        edge: Edge,
    },
    /// To the instant a connection stops being short-lived (`ejection.short_lived` after it was
    /// made, about the edge); nothing if that is past.
    ShortLived {
        /// Handle index.
        handle: u8,
        /// Which side of the edge.
        edge: Edge,
    },
}

/// How a call begun with [`Op::Begin`] ends.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `CallGuard::success`.
    Success,
    /// `CallGuard::failure`.
    Failure,
    /// The guard is dropped unfinished.
    Cancel,
}

/// What the scripted connector does with the connect of one [`Op::GetOrConnect`].
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectScript {
    /// Connects at once.
    Ok,
    /// Fails at once.
    Fail,
    /// Never finishes: the connect timeout ends it.
    Hang,
    /// Connects 1 ms before the connect timeout.
    Slow,
}

/// One operation on the pool. Handles index every connection the run has seen (inserted or
/// connected), calls index the calls in flight; both modulo their count.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `try_insert(addr, new connection)`.
    Insert {
        /// Address index.
        addr: u8,
    },
    /// `get(addr)`.
    Get {
        /// Address index.
        addr: u8,
    },
    /// `remove(addr)`.
    Remove {
        /// Address index.
        addr: u8,
    },
    /// `remove_connection(handle)`: possibly a stale one (I14).
    RemoveConnection {
        /// Handle index.
        handle: u8,
    },
    /// `handle.begin()`: a call in flight, kept until an [`Op::Finish`].
    Begin {
        /// Handle index.
        handle: u8,
    },
    /// Ends a call in flight.
    Finish {
        /// Call index.
        call: u8,
        /// How.
        how: Finish,
    },
    /// `handle.mark_closed()`.
    MarkClosed {
        /// Handle index.
        handle: u8,
    },
    /// The transport of a connection dies: the connector's `is_open` turns false (I8).
    DropTransport {
        /// Handle index.
        handle: u8,
    },
    /// `record_success(addr, latency)`: the original's address-keyed interface.
    RecordSuccess {
        /// Address index.
        addr: u8,
        /// Latency in milliseconds.
        latency_ms: u8,
    },
    /// `record_error(addr)`.
    RecordError {
        /// Address index.
        addr: u8,
    },
    /// `tokio::time::advance`.
    Advance(Step),
    /// `evict_idle().await`.
    EvictIdle,
    /// `evict_unhealthy().await`.
    EvictUnhealthy,
    /// `get_or_connect(addr).await`, with the connect (if one is made) scripted.
    GetOrConnect {
        /// Address index.
        addr: u8,
        /// What the connector does.
        script: ConnectScript,
    },
    /// Two `get_or_connect(addr)` calls polled together: if the first dials, the second joins its
    /// flight and both get its one result (I4).
    GetOrConnectTwice {
        /// Address index.
        addr: u8,
        /// What the connector does.
        script: ConnectScript,
    },
    /// `clear()`.
    Clear,
    /// `close().await`, with a cleanup task running (I17).
    Close,
    /// `prune_addresses().await`: forgets the addresses that hold nothing any more (I18).
    PruneAddresses,
    /// `mark_up(addr)`: ends the backoff of the address and forgets its ejection count (I12).
    MarkUp {
        /// Address index.
        addr: u8,
    },
    /// `close().await` while a `get_or_connect(addr)` is waiting for its connect: a connect still
    /// running is abandoned at once (its future dropped, nothing made) and the caller gets
    /// `PoolError::Closed` (I17).
    CloseWhileConnecting {
        /// Address index.
        addr: u8,
        /// What the connector does.
        script: ConnectScript,
    },
    /// `warm_up(addrs, 1).await`: the addresses (repeats included) connected one at a time, every
    /// connect scripted alike (drawn instant: `Ok` or `Fail`); the report has one result per distinct address, each what a
    /// `get_or_connect` of it would have returned at its turn.
    WarmUp {
        /// Address indices, in the order given.
        addrs: [u8; 3],
        /// What the connector does with every connect of the warm-up.
        script: ConnectScript,
    },
    /// `checkout(addr)`, spawned as a task of its own: it gets a connection at once, fails at once
    /// (closed, backing off with nothing to wait for), or waits in line; the harness polls every
    /// waiting checkout after each op and as virtual time passes (I19–I22).
    Checkout {
        /// Address index.
        addr: u8,
    },
    /// Drops a held checkout: the connection goes to the oldest caller in line of its address or
    /// idles; with `broken` (`mark_broken`) it is closed instead. With `cancel_first`, the oldest
    /// caller in line is dropped in the same instant, before it could take what was handed to it:
    /// the connection must go to the next caller (I22).
    Return {
        /// Held checkout index.
        held: u8,
        /// `mark_broken` first.
        broken: bool,
        /// Drop the oldest caller in line of the address right after.
        cancel_first: bool,
    },
    /// Drops the future of a waiting checkout (I22: it leaves nothing counted).
    DropWaiter {
        /// Waiting checkout index.
        waiter: u8,
    },
    /// The server at `addr` refuses (down) or accepts (up) the connects nobody scripted: those of
    /// checkouts, made in the pool's own tasks whenever a line wants one.
    Server {
        /// Address index.
        addr: u8,
        /// Accepts connects.
        up: bool,
    },
}

/// The pool's configuration as small choices, each an index into a list of values that matter
/// (the first is the default-like one, where shrinking goes). See [`Settings`](crate::Settings).
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Knobs {
    /// `max_connections`: 0 (unlimited) to 4.
    pub max: u8,
    /// `max_idle`: 1 s, 50 ms, 60 s, off.
    pub idle: u8,
    /// Consecutive-failure threshold: 5, 1, 2, 3, off.
    pub threshold: u8,
    /// Failure ratio: 0.5, 0.25, 1.0.
    pub ratio: u8,
    /// Minimum request volume: 20, 1, 3.
    pub min_requests: u8,
    /// Health window: 10 s, 80 ms, 1 ms.
    pub window: u8,
    /// `WhenFull::EvictLeastRecentlyUsed` instead of `Reject`.
    pub lru: bool,
    /// Backoff jitter: 0, 0.2.
    pub jitter: u8,
    /// Backoff base: 1 s, 1 ms, 100 ms.
    pub base: u8,
    /// Backoff cap as a multiple of the base: 120, 1, 4.
    pub cap: u8,
    /// Connect timeout: 3 s, 1 ms, 50 ms.
    pub timeout: u8,
    /// Backoff multiplier: 1.6, 2, 1, 16.
    pub multiplier: u8,
    /// `ejection.short_lived`: 5 s, 0 (off), 100 ms.
    pub short_lived: u8,
    /// `ejection.decay_interval`: 30 s, 1 s, 50 ms, 1 ms.
    pub decay: u8,
    /// `max_per_address`: 1 (the default), 2, 3.
    pub per_address: u8,
    /// `checkout_timeout`: unset (the connect timeout), 100 ms, 1 s.
    pub checkout_timeout: u8,
    /// `busy_in_flight`: never (`u64::MAX`: one shared connection per address, as before issue
    /// 13), 1, 2 (I23: with `per_address` above 1, a hit on an address whose every shared
    /// connection has that many calls in flight connects another in the background).
    pub busy: u8,
}

/// A whole input: the configuration, then the ops. The ops come last so that
/// `arbitrary_take_rest` gives them every remaining byte.
#[derive(Arbitrary, Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    /// The configuration.
    pub knobs: Knobs,
    /// The operations, in order.
    pub ops: Vec<Op>,
}

/// Strategy for [`Knobs`]: every choice of every field.
pub fn knobs() -> impl Strategy<Value = Knobs> {
    (
        (0u8..5, 0u8..4, 0u8..5, 0u8..3, 0u8..3, 0u8..3),
        (any::<bool>(), 0u8..2, 0u8..3, 0u8..3, 0u8..3),
        (0u8..4, 0u8..3, 0u8..4),
    )
        .prop_map(
            |(
                (max, idle, threshold, ratio, min_requests, window),
                (lru, jitter, base, cap, timeout),
                (multiplier, short_lived, decay),
            )| Knobs {
                per_address: 0,
                checkout_timeout: 0,
                busy: 0,
                max,
                idle,
                threshold,
                ratio,
                min_requests,
                window,
                lru,
                jitter,
                base,
                cap,
                timeout,
                multiplier,
                short_lived,
                decay,
            },
        )
}

fn edge() -> impl Strategy<Value = Edge> {
    prop_oneof![Just(Edge::At), Just(Edge::Before), Just(Edge::After)]
}

/// Strategy for [`Step`]: mostly short steps, and steps onto the edges that matter.
pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u16..2_000).prop_map(Step::Millis),
        1 => (0u16..=u16::MAX).prop_map(Step::Millis),
        3 => edge().prop_map(Step::MaxIdle),
        1 => Just(Step::ConnectTimeout),
        2 => Just(Step::WindowBucket),
        2 => (0..ADDRS, edge()).prop_map(|(addr, edge)| Step::Backoff { addr, edge }),
        1 => (0..ADDRS, edge()).prop_map(|(addr, edge)| Step::Decay { addr, edge }),
        1 => (any::<u8>(), edge()).prop_map(|(handle, edge)| Step::ShortLived { handle, edge }),
    ]
}

fn finish() -> impl Strategy<Value = Finish> {
    prop_oneof![
        Just(Finish::Success),
        Just(Finish::Failure),
        Just(Finish::Cancel)
    ]
}

fn script() -> impl Strategy<Value = ConnectScript> {
    prop_oneof![
        3 => Just(ConnectScript::Ok),
        2 => Just(ConnectScript::Fail),
        1 => Just(ConnectScript::Hang),
        1 => Just(ConnectScript::Slow),
    ]
}

/// Strategy for one [`Op`], weighted towards the ops that build up state. Alternatives listed
/// first are where shrinking goes.
pub fn op() -> impl Strategy<Value = Op> {
    let a = || 0..ADDRS;
    let h = any::<u8>;
    prop_oneof![
        5 => a().prop_map(|addr| Op::Insert { addr }),
        4 => a().prop_map(|addr| Op::Get { addr }),
        5 => step().prop_map(Op::Advance),
        3 => Just(Op::EvictIdle),
        3 => Just(Op::EvictUnhealthy),
        4 => (h(), finish()).prop_map(|(call, how)| Op::Finish { call, how }),
        4 => h().prop_map(|handle| Op::Begin { handle }),
        4 => (a(), script()).prop_map(|(addr, script)| Op::GetOrConnect { addr, script }),
        2 => (a(), script()).prop_map(|(addr, script)| Op::GetOrConnectTwice { addr, script }),
        3 => a().prop_map(|addr| Op::RecordError { addr }),
        1 => (a(), any::<u8>()).prop_map(|(addr, latency_ms)| Op::RecordSuccess { addr, latency_ms }),
        1 => a().prop_map(|addr| Op::Remove { addr }),
        1 => h().prop_map(|handle| Op::RemoveConnection { handle }),
        1 => h().prop_map(|handle| Op::MarkClosed { handle }),
        1 => h().prop_map(|handle| Op::DropTransport { handle }),
        1 => Just(Op::Clear),
        2 => Just(Op::PruneAddresses),
        1 => a().prop_map(|addr| Op::MarkUp { addr }),
        // Instant connects only: a warm-up's connects run back to back, and the harness sees the
        // pool's backoffs only at the end, when a timed-out connect's may have run out already
        // (GetOrConnect covers slow and hung connects, tests/warmup.rs a warm-up's deadlines).
        2 => ([a(), a(), a()], prop_oneof![Just(ConnectScript::Ok), Just(ConnectScript::Fail)])
            .prop_map(|(addrs, script)| Op::WarmUp { addrs, script }),
    ]
}

/// How a sequence ends: a [`Op::Close`], or a close racing a connect, appended at the end of
/// some sequences rather than drawn in the middle, where they would make the rest moot.
fn ending() -> impl Strategy<Value = Option<Op>> {
    prop_oneof![
        8 => Just(None),
        1 => Just(Some(Op::Close)),
        1 => (0..ADDRS, script()).prop_map(|(addr, script)| Some(Op::CloseWhileConnecting { addr, script })),
    ]
}

/// Strategy for a [`Scenario`] of up to `max_ops` ops, some ending with a close.
pub fn scenario(max_ops: usize) -> impl Strategy<Value = Scenario> {
    (
        knobs(),
        proptest::collection::vec(op(), 0..=max_ops),
        ending(),
    )
        .prop_map(|(knobs, mut ops, end)| {
            ops.extend(end);
            Scenario { knobs, ops }
        })
}

/// Strategy for the knobs of a checkout scenario: every knob of [`knobs`], a small global cap
/// (1 to 4, or unlimited) and every `max_per_address`, checkout timeout and `busy_in_flight`
/// (so the shared connections of an address grow beside its exclusive ones, I23).
pub fn checkout_knobs() -> impl Strategy<Value = Knobs> {
    (
        knobs(),
        prop_oneof![3 => 1u8..5, 1 => Just(0u8)],
        0u8..3,
        0u8..3,
        0u8..3,
    )
        .prop_map(|(k, max, per_address, checkout_timeout, busy)| Knobs {
            max,
            per_address,
            checkout_timeout,
            busy,
            ..k
        })
}

/// Strategy for one op of a checkout scenario: the checkout ops weighted up, mixed with every
/// shared op (they share the cap, the backoff and the sweeps with the checkouts).
pub fn checkout_op() -> impl Strategy<Value = Op> {
    let a = || 0..ADDRS / 2;
    prop_oneof![
        6 => a().prop_map(|addr| Op::Checkout { addr }),
        5 => (any::<u8>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(held, broken, cancel_first)| Op::Return { held, broken, cancel_first }),
        1 => any::<u8>().prop_map(|waiter| Op::DropWaiter { waiter }),
        1 => (a(), prop::bool::weighted(0.6)).prop_map(|(addr, up)| Op::Server { addr, up }),
        4 => (0u16..300).prop_map(|ms| Op::Advance(Step::Millis(ms))),
        6 => op(),
    ]
}

/// Strategy for a checkout [`Scenario`] of up to `max_ops` ops, some ending with a close.
pub fn checkout_scenario(max_ops: usize) -> impl Strategy<Value = Scenario> {
    (
        checkout_knobs(),
        proptest::collection::vec(checkout_op(), 0..=max_ops),
        ending(),
    )
        .prop_map(|(knobs, mut ops, end)| {
            ops.extend(end);
            Scenario { knobs, ops }
        })
}

/// Strategy for the knobs of a scenario with several shared connections per address (I23):
/// every knob of [`knobs`], `max_per_address` 1–3 (mostly above 1), `busy_in_flight` 1 or 2
/// mostly (and sometimes never, today's one connection), and a cap that sometimes stops growth.
pub fn shared_knobs() -> impl Strategy<Value = Knobs> {
    (
        knobs(),
        prop_oneof![1 => Just(0u8), 3 => 1u8..3],
        prop_oneof![1 => Just(0u8), 4 => 1u8..3],
        prop_oneof![2 => Just(0u8), 3 => 2u8..5],
    )
        .prop_map(|(k, per_address, busy, max)| Knobs {
            per_address,
            busy,
            max,
            ..k
        })
}

/// Strategy for one op of a shared-growth scenario: calls begun and finished across ops on few
/// addresses (so that every connection of an address gets busy and the address grows), hits,
/// removals by connection, transports dying, servers refusing the background connects, mixed
/// with every shared op.
pub fn shared_op() -> impl Strategy<Value = Op> {
    let a = || 0..ADDRS / 2;
    prop_oneof![
        6 => any::<u8>().prop_map(|handle| Op::Begin { handle }),
        4 => (any::<u8>(), finish()).prop_map(|(call, how)| Op::Finish { call, how }),
        6 => (a(), prop_oneof![4 => Just(ConnectScript::Ok), 1 => Just(ConnectScript::Fail)])
            .prop_map(|(addr, script)| Op::GetOrConnect { addr, script }),
        3 => a().prop_map(|addr| Op::Get { addr }),
        1 => (a(), Just(ConnectScript::Ok)).prop_map(|(addr, script)| Op::GetOrConnectTwice { addr, script }),
        2 => any::<u8>().prop_map(|handle| Op::RemoveConnection { handle }),
        1 => a().prop_map(|addr| Op::Remove { addr }),
        1 => a().prop_map(|addr| Op::Insert { addr }),
        1 => any::<u8>().prop_map(|handle| Op::DropTransport { handle }),
        1 => (a(), prop::bool::weighted(0.6)).prop_map(|(addr, up)| Op::Server { addr, up }),
        6 => op(),
    ]
}

/// Strategy for a shared-growth [`Scenario`] (I23) of up to `max_ops` ops, some ending with a
/// close.
pub fn shared_scenario(max_ops: usize) -> impl Strategy<Value = Scenario> {
    (
        shared_knobs(),
        proptest::collection::vec(shared_op(), 0..=max_ops),
        ending(),
    )
        .prop_map(|(knobs, mut ops, end)| {
            ops.extend(end);
            Scenario { knobs, ops }
        })
}
