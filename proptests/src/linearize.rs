//! Histories of the threaded tier (`tests/threaded.rs`) and a linearizability checker for the
//! operations that do not depend on time.
//!
//! A history is a list of [`Event`]s: an operation, its result, and the ticks of a global logical
//! clock (an `AtomicU64`, ticked at invocation and at response) taken by the thread that ran it.
//! Event `a` precedes event `b` in real time iff `a.ret < b.inv`.
//!
//! [`linearizable`] decides whether some serial order of the events, consistent with real time,
//! lets a sequential [`Spec`] produce exactly the recorded results (Wing & Gong's search, with
//! Lowe's memoization of `(events done per thread, model state)`). The sequential model is a map
//! address → connection serial, a cap counting pooled addresses, and a closed flag:
//! - `insert`/`try_insert` into a present address replaces its connection and never fails for
//!   capacity (I2); into a new address at the cap it is refused (`AtCapacity`) under
//!   `WhenFull::Reject`, and under `WhenFull::EvictLeastRecentlyUsed` it evicts the connection of
//!   some other address (any: which one is least recently used depends on time, not checked here)
//!   and is refused only if there is none. Making room and placing are two steps inside the
//!   insert's interval (they touch two addresses), so the eviction may be seen before the new
//!   connection is; an insert that evicted and is then refused, or that evicts when the pool is no
//!   longer full, is still a violation;
//! - `get` returns the pooled connection, `remove` takes it, `remove_connection` takes it only if it
//!   is still that connection (I14);
//! - `close` is not one atomic step: inside its interval it first refuses new work (inserts return
//!   `Closed`), then removes the pooled connections one at a time (any of them may be gone while it
//!   runs), and when it returns the pool is empty; from then on every operation returns `Closed` /
//!   `None` / `false` (I17). A caller racing `close` may still get a connection that the close then
//!   closes (issue 11: "close() is a cut"); once `close` has returned, nothing may.
//!
//! [`minimize`] cuts a [`Witness`] out of a non-linearizable history: a short part of it, with
//! the state(s) the pool may be in before it, that is not linearizable on its own. Every cut is
//! one that can never make a linearizable history non-linearizable, so the witness is a proof on
//! its own, not an artefact of shrinking. [`diagnose`] names the invariant and the defect.

use std::collections::HashSet;
use std::fmt;

/// Connection serials are the books' serials (`BookConn::serial`).
pub type Serial = u64;

/// An operation of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `try_insert(addr, conn #serial)`.
    TryInsert {
        /// Address index.
        addr: u8,
        /// The hand-made connection.
        serial: Serial,
    },
    /// `insert(addr, conn #serial)` (the `bool` API).
    Insert {
        /// Address index.
        addr: u8,
        /// The hand-made connection.
        serial: Serial,
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
    /// `remove_connection(handle of #serial)`.
    RemoveConnection {
        /// Address index.
        addr: u8,
        /// The connection the handle is for.
        serial: Serial,
    },
    /// `close().await`.
    Close,
    /// `get_or_connect(addr).await`.
    GetOrConnect {
        /// Address index.
        addr: u8,
    },
    /// `get(addr)`, then a call on it, finished as a success or a failure.
    Call {
        /// Address index.
        addr: u8,
        /// Finished as a success.
        ok: bool,
    },
    /// `evict_idle().await`.
    EvictIdle,
    /// `evict_unhealthy().await`.
    EvictUnhealthy,
    /// The transport of a held connection dies (`BookConn::kill`).
    Kill {
        /// Address index.
        addr: u8,
        /// The connection.
        serial: Serial,
    },
}

/// The result of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Res {
    /// `try_insert` / `get_or_connect` returned this connection.
    Conn(Serial),
    /// `try_insert` / `get_or_connect` returned `AtCapacity`.
    AtCapacity,
    /// `try_insert` / `get_or_connect` returned `Closed`.
    Closed,
    /// `get_or_connect` returned another error (its text, shortened).
    Error(String),
    /// `insert` returned this.
    Inserted(bool),
    /// `get` / `remove` / the `get` of a call returned this.
    Found(Option<Serial>),
    /// `remove_connection` returned this.
    Removed(bool),
    /// A sweep evicted this many.
    Evicted(usize),
    /// Nothing to report (`close`, `kill`).
    Done,
}

/// One operation of a history, with its result and its interval on the logical clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The thread that ran it.
    pub thread: usize,
    /// Tick taken just before the call.
    pub inv: u64,
    /// Tick taken just after it returned.
    pub ret: u64,
    /// What was called.
    pub op: Op,
    /// What it returned.
    pub res: Res,
}

impl Event {
    /// The address index the event is about, if any.
    pub fn addr(&self) -> Option<u8> {
        match self.op {
            Op::TryInsert { addr, .. }
            | Op::Insert { addr, .. }
            | Op::Get { addr }
            | Op::Remove { addr }
            | Op::RemoveConnection { addr, .. }
            | Op::GetOrConnect { addr }
            | Op::Call { addr, .. }
            | Op::Kill { addr, .. } => Some(addr),
            Op::Close | Op::EvictIdle | Op::EvictUnhealthy => None,
        }
    }

    /// `self` overlaps `other` in real time (neither ended before the other began).
    pub fn overlaps(&self, other: &Event) -> bool {
        self.inv < other.ret && other.inv < self.ret
    }

    /// Whether the event, with its result, changes the model state in no linearization: dropping
    /// such an event from a linearizable history leaves it linearizable.
    fn effect_free(&self) -> bool {
        match (&self.op, &self.res) {
            (Op::Get { .. }, _) => true,
            (Op::TryInsert { .. }, res) => !matches!(res, Res::Conn(_)),
            (Op::Insert { .. }, res) => *res == Res::Inserted(false),
            (Op::Remove { .. }, res) => *res == Res::Found(None),
            (Op::RemoveConnection { .. }, res) => *res == Res::Removed(false),
            _ => false,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::TryInsert { addr, serial } => write!(f, "try_insert(a{addr}, #{serial})"),
            Op::Insert { addr, serial } => write!(f, "insert(a{addr}, #{serial})"),
            Op::Get { addr } => write!(f, "get(a{addr})"),
            Op::Remove { addr } => write!(f, "remove(a{addr})"),
            Op::RemoveConnection { addr, serial } => {
                write!(f, "remove_connection(a{addr} #{serial})")
            }
            Op::Close => f.write_str("close()"),
            Op::GetOrConnect { addr } => write!(f, "get_or_connect(a{addr})"),
            Op::Call { addr, ok } => {
                write!(
                    f,
                    "get(a{addr}) + call {}",
                    if ok { "ok" } else { "failed" }
                )
            }
            Op::EvictIdle => f.write_str("evict_idle()"),
            Op::EvictUnhealthy => f.write_str("evict_unhealthy()"),
            Op::Kill { addr, serial } => write!(f, "kill transport (a{addr} #{serial})"),
        }
    }
}

impl fmt::Display for Res {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Res::Conn(s) => write!(f, "Ok(#{s})"),
            Res::AtCapacity => f.write_str("Err(AtCapacity)"),
            Res::Closed => f.write_str("Err(Closed)"),
            Res::Error(e) => write!(f, "Err({e})"),
            Res::Inserted(b) => write!(f, "{b}"),
            Res::Found(Some(s)) => write!(f, "Some(#{s})"),
            Res::Found(None) => f.write_str("None"),
            Res::Removed(b) => write!(f, "{b}"),
            Res::Evicted(n) => write!(f, "{n}"),
            Res::Done => f.write_str("()"),
        }
    }
}

/// The history as lines, in invocation order: `t<thread> [inv, ret] op -> result` (at most 80:
/// the first and last 40 of a longer one).
pub fn render(events: &[Event]) -> String {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.inv);
    let mut out = String::new();
    if sorted.len() > 80 {
        let n = sorted.len();
        let tail = sorted.split_off(n - 40);
        sorted.truncate(40);
        out = render(&sorted.into_iter().cloned().collect::<Vec<_>>());
        out.push_str(&format!("    ... {} more ...\n", n - 80));
        out.push_str(&render(&tail.into_iter().cloned().collect::<Vec<_>>()));
        return out;
    }
    for e in sorted {
        out.push_str(&format!(
            "    t{} [{:>4}, {:>4}] {} -> {}\n",
            e.thread, e.inv, e.ret, e.op, e.res
        ));
    }
    out
}

/// The sequential specification: the pool's configuration as the model needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// `max_connections` (`0` = unlimited).
    pub cap: usize,
    /// `WhenFull::EvictLeastRecentlyUsed` (else `Reject`).
    pub lru: bool,
}

/// The model's rules: the spec, and (only to diagnose a failure) a lenient reading of LRU.
#[derive(Debug, Clone, Copy)]
struct Rules {
    spec: Spec,
    /// An insert of a new address may evict another address's connection whether or not the pool
    /// is full when it does (so two racing inserts of one address may each evict one).
    lenient_lru: bool,
}

/// Address indices the model handles.
pub const MODEL_ADDRS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct State {
    /// `close` has begun: new work is refused.
    refusing: bool,
    /// `close` has begun and not yet ended: it removes the pooled connections one at a time, so
    /// any of them may already be gone.
    draining: bool,
    map: [Option<Serial>; MODEL_ADDRS],
}

impl State {
    const EMPTY: State = State {
        refusing: false,
        draining: false,
        map: [None; MODEL_ADDRS],
    };

    fn describe(&self) -> String {
        let pooled: Vec<String> = (0..MODEL_ADDRS)
            .filter_map(|a| self.map[a].map(|s| format!("a{a} = #{s}")))
            .collect();
        let pooled = if pooled.is_empty() {
            "empty".to_string()
        } else {
            format!("{{{}}}", pooled.join(", "))
        };
        match (self.refusing, self.draining) {
            (false, _) => pooled,
            (true, true) => format!("{pooled}, closing"),
            (true, false) => format!("{pooled}, closed"),
        }
    }

    fn count(&self) -> usize {
        self.map.iter().filter(|s| s.is_some()).count()
    }
}

/// A step of a history as the checker sees it: `close` is two steps.
#[derive(Debug, Clone, Copy)]
enum Step {
    Op(usize),
    /// Under LRU, the eviction an insert of a new address may make before it places.
    MakeRoom(usize),
    CloseRefuse(usize),
    CloseEmpty(usize),
}

impl Step {
    fn event(self) -> usize {
        match self {
            Step::Op(i) | Step::MakeRoom(i) | Step::CloseRefuse(i) | Step::CloseEmpty(i) => i,
        }
    }
}

/// The states `s` may move to when `step` returns what `events` recorded (none: the result is
/// impossible in `s`).
fn next_states(rules: Rules, s: State, step: Step, events: &[Event]) -> Vec<State> {
    match step {
        Step::CloseRefuse(_) => vec![State {
            refusing: true,
            draining: true,
            ..s
        }],
        Step::CloseEmpty(_) => vec![State {
            refusing: true,
            draining: false,
            map: [None; MODEL_ADDRS],
        }],
        Step::Op(_) | Step::MakeRoom(_) if s.draining => {
            // While close() drains, any connection still pooled may already have been removed.
            let pooled: Vec<usize> = (0..MODEL_ADDRS).filter(|&a| s.map[a].is_some()).collect();
            let mut out = Vec::new();
            for mask in 0..1u32 << pooled.len() {
                let mut d = s;
                for (bit, &a) in pooled.iter().enumerate() {
                    if mask & (1 << bit) != 0 {
                        d.map[a] = None;
                    }
                }
                for n in step_states(rules, d, step, events) {
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
            out
        }
        Step::Op(_) | Step::MakeRoom(_) => step_states(rules, s, step, events),
    }
}

fn step_states(rules: Rules, s: State, step: Step, events: &[Event]) -> Vec<State> {
    match step {
        Step::MakeRoom(i) => make_room_states(rules, s, &events[i]),
        _ => op_states(rules.spec, s, &events[step.event()]),
    }
}

/// Under LRU, an insert of a new address finding the pool full evicts some other address's
/// connection, then places its own: two steps (two addresses), so the eviction may be seen
/// before the new connection is. It may also find room after all, and evict nothing.
fn make_room_states(rules: Rules, s: State, e: &Event) -> Vec<State> {
    let mut out = vec![s];
    let (Op::TryInsert { addr, .. } | Op::Insert { addr, .. }) = e.op else {
        return out;
    };
    let a = usize::from(addr);
    let full = rules.spec.cap != 0 && s.count() >= rules.spec.cap;
    if s.map[a].is_none() && (full || rules.lenient_lru) {
        for b in 0..MODEL_ADDRS {
            if b != a && s.map[b].is_some() {
                let mut n = s;
                n.map[b] = None;
                out.push(n);
            }
        }
    }
    out
}

/// The states an operation may move `s` to, given its recorded result.
fn op_states(spec: Spec, s: State, e: &Event) -> Vec<State> {
    let mut out = Vec::new();
    {
        match (e.op, &e.res) {
            (Op::TryInsert { addr, serial } | Op::Insert { addr, serial }, res) => {
                let a = usize::from(addr);
                let bool_api = matches!(e.op, Op::Insert { .. });
                let ok = if bool_api {
                    *res == Res::Inserted(true)
                } else {
                    *res == Res::Conn(serial)
                };
                let refused_closed = if bool_api {
                    *res == Res::Inserted(false)
                } else {
                    *res == Res::Closed
                };
                let refused_full = if bool_api {
                    *res == Res::Inserted(false)
                } else {
                    *res == Res::AtCapacity
                };
                if s.refusing {
                    if refused_closed {
                        out.push(s);
                    }
                } else if s.map[a].is_some() || spec.cap == 0 || s.count() < spec.cap {
                    // I2: a present address is replaced, never refused for capacity.
                    if ok {
                        let mut n = s;
                        n.map[a] = Some(serial);
                        out.push(n);
                    }
                } else if spec.lru {
                    if ok {
                        for b in 0..MODEL_ADDRS {
                            if b != a && s.map[b].is_some() {
                                let mut n = s;
                                n.map[b] = None;
                                n.map[a] = Some(serial);
                                out.push(n);
                            }
                        }
                    }
                    if refused_full && s.map.iter().enumerate().all(|(b, c)| b == a || c.is_none())
                    {
                        out.push(s);
                    }
                } else if refused_full {
                    out.push(s);
                }
            }
            (Op::Get { addr }, Res::Found(got)) => {
                if *got == s.map[usize::from(addr)] {
                    out.push(s);
                }
            }
            (Op::Remove { addr }, Res::Found(got)) => {
                let a = usize::from(addr);
                if *got == s.map[a] {
                    let mut n = s;
                    n.map[a] = None;
                    out.push(n);
                }
            }
            (Op::RemoveConnection { addr, serial }, Res::Removed(got)) => {
                let a = usize::from(addr);
                let present = s.map[a] == Some(serial);
                if *got == present {
                    let mut n = s;
                    if present {
                        n.map[a] = None;
                    }
                    out.push(n);
                }
            }
            (op, res) => panic!("the linearizability model has no {op} -> {res}"),
        }
    }
    out
}

fn steps_per_thread(spec: Spec, events: &[Event]) -> Vec<Vec<Step>> {
    let threads = events.iter().map(|e| e.thread + 1).max().unwrap_or(0);
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&i| events[i].inv);
    let mut per = vec![Vec::new(); threads];
    for i in order {
        let e = &events[i];
        if e.op == Op::Close {
            per[e.thread].push(Step::CloseRefuse(i));
            per[e.thread].push(Step::CloseEmpty(i));
        } else {
            if spec.lru && matches!(e.op, Op::TryInsert { .. } | Op::Insert { .. }) {
                per[e.thread].push(Step::MakeRoom(i));
            }
            per[e.thread].push(Step::Op(i));
        }
    }
    per
}

/// Whether `events` (complete operations, each thread's in order) is linearizable against `spec`,
/// starting from an empty open pool.
pub fn linearizable(spec: Spec, events: &[Event]) -> bool {
    check(rules(spec), events, &[State::EMPTY])
}

fn rules(spec: Spec) -> Rules {
    Rules {
        spec,
        lenient_lru: false,
    }
}

/// Whether `events` is linearizable under `rules` from one of `starts`.
fn check(rules: Rules, events: &[Event], starts: &[State]) -> bool {
    explore(rules, events, starts, false).0
}

/// The states the pool may be in once every one of `events` has taken effect, from `starts`
/// (none: not linearizable).
fn finals(rules: Rules, events: &[Event], starts: &[State]) -> Vec<State> {
    explore(rules, events, starts, true).1
}

fn explore(
    rules: Rules,
    events: &[Event],
    starts: &[State],
    every_end: bool,
) -> (bool, Vec<State>) {
    for e in events {
        if let Some(a) = e.addr() {
            assert!(
                usize::from(a) < MODEL_ADDRS,
                "address a{a} beyond the model"
            );
        }
    }
    let per = steps_per_thread(rules.spec, events);
    // A search of the graph of (steps done per thread, model state), each node visited once (Lowe's
    // memoization of Wing & Gong's search); iterative, so that long histories need no deep stack.
    let mut seen: HashSet<(Vec<usize>, State)> = HashSet::new();
    let mut todo = Vec::new();
    for &s in starts {
        let node = (vec![0usize; per.len()], s);
        if seen.insert(node.clone()) {
            todo.push(node);
        }
    }
    let mut ends = Vec::new();
    while let Some((done, s)) = todo.pop() {
        // The earliest response among the next step of every thread: a step may be linearized
        // next only if it was invoked before that (no pending operation ended before it began).
        let mut min_ret = u64::MAX;
        let mut all_done = true;
        for (t, steps) in per.iter().enumerate() {
            if let Some(step) = steps.get(done[t]) {
                all_done = false;
                min_ret = min_ret.min(events[step.event()].ret);
            }
        }
        if all_done {
            if !every_end {
                return (true, vec![s]);
            }
            if !ends.contains(&s) {
                ends.push(s);
            }
            continue;
        }
        for (t, steps) in per.iter().enumerate() {
            let Some(&step) = steps.get(done[t]) else {
                continue;
            };
            if events[step.event()].inv > min_ret {
                continue;
            }
            for n in next_states(rules, s, step, events) {
                let mut next = done.clone();
                next[t] += 1;
                let node = (next, n);
                if !seen.contains(&node) {
                    seen.insert(node.clone());
                    todo.push(node);
                }
            }
        }
    }
    (!ends.is_empty(), ends)
}

/// A violation cut out of a non-linearizable history by [`minimize`]: events that are not
/// linearizable from any state the pool may be in after the operations skipped before them.
#[derive(Debug, Clone)]
pub struct Witness {
    /// The violating events.
    pub events: Vec<Event>,
    /// Operations of the round before them (linearizable on their own), skipped.
    pub skipped: usize,
    starts: Vec<State>,
}

impl Witness {
    /// The witness as lines: where it starts from, then its events in invocation order.
    pub fn render(&self) -> String {
        let from = if self.skipped == 0 {
            "    from an empty pool:\n".to_string()
        } else {
            let states: Vec<String> = self.starts.iter().map(State::describe).collect();
            format!(
                "    from the pool as the round's first {} operations (linearizable) leave it: {}\n",
                self.skipped,
                states.join(" or ")
            )
        };
        from + &render(&self.events)
    }
}

/// A short violation inside `events` (which must not be linearizable), made only of cuts that can
/// never turn a linearizable history into a non-linearizable one, so that what remains is a
/// violation on its own:
/// - what follows a quiescent instant (no operation in progress), when what precedes it is not
///   linearizable: every operation before precedes every one after in any serial order
///   consistent with real time;
/// - what precedes a quiescent instant, when what follows is not linearizable from any state it
///   may leave the pool in (it is replaced by those states);
/// - under `Reject`, every event of one address absent from those states, when every refusal for
///   capacity kept ended before the first of them began (the dropped address was absent at each
///   refusal, and fewer pooled addresses never make a granted insert impossible);
/// - events that change the model in no serial order (reads, removals that found nothing,
///   refused inserts), in halving chunks down to one by one; reads first, so that a refusal that
///   is a violation by itself stays in the history that is shown.
///
/// When only an over-eviction explains the results (LRU evicting though the pool was no longer
/// full), what precedes the stretch is kept: the evicting insert may be there.
pub fn minimize(spec: Spec, events: &[Event]) -> Witness {
    let rules = rules(spec);
    let mut starts = vec![State::EMPTY];
    debug_assert!(!check(rules, events, &starts));
    let mut cur: Vec<Event> = events.to_vec();
    cur.sort_by_key(|e| e.inv);
    let mut skipped = 0;
    // When only an over-eviction explains the results (see `diagnose`), the evicting insert may be
    // anywhere before the stretch that shows it: keep what precedes the stretch.
    let over_eviction = spec.lru
        && check(
            Rules {
                spec,
                lenient_lru: true,
            },
            events,
            &starts,
        );
    loop {
        let before = (cur.len(), skipped);
        // Forward over the stretches between quiescent instants, carrying the states the pool may
        // be in at each instant, up to the first stretch with no linearization from them: that
        // stretch, from those states, is the violation (what follows it is dropped, what precedes
        // it is replaced by the states it leaves).
        let mut bounds = vec![0];
        bounds.extend(quiescent_cuts(&cur));
        bounds.push(cur.len());
        let mut states = starts.clone();
        for w in bounds.windows(2) {
            let next = finals(rules, &cur[w[0]..w[1]], &states);
            if next.is_empty() {
                if w[0] > 0 && !over_eviction {
                    skipped += w[0];
                    starts = states;
                    cur = cur[w[0]..w[1]].to_vec();
                } else {
                    cur.truncate(w[1]);
                }
                break;
            }
            states = next;
        }
        if !spec.lru {
            let mut addrs: Vec<u8> = cur.iter().filter_map(Event::addr).collect();
            addrs.sort_unstable();
            addrs.dedup();
            for a in addrs {
                if starts.iter().any(|s| s.map[usize::from(a)].is_some()) {
                    continue;
                }
                let first = cur
                    .iter()
                    .filter(|e| e.addr() == Some(a))
                    .map(|e| e.inv)
                    .min()
                    .unwrap_or(u64::MAX);
                let refusals_before = cur
                    .iter()
                    .filter(|e| refused_for_capacity(e) && e.addr() != Some(a))
                    .all(|e| e.ret < first);
                if !refusals_before {
                    continue;
                }
                let without: Vec<Event> = cur
                    .iter()
                    .filter(|e| e.addr() != Some(a))
                    .cloned()
                    .collect();
                if !without.is_empty() && !check(rules, &without, &starts) {
                    cur = without;
                }
            }
        }
        // Events with no effect, in ever smaller chunks (one by one would be quadratic in long
        // windows); reads first, so that a refusal that is a violation by itself stays.
        for reads_only in [true, false] {
            let droppable = |e: &Event| {
                e.effect_free()
                    && !(reads_only && matches!(e.op, Op::TryInsert { .. } | Op::Insert { .. }))
            };
            let mut chunk = cur.len().next_power_of_two();
            while chunk >= 1 {
                let mut i = 0;
                while i < cur.len() {
                    let end = (i + chunk).min(cur.len());
                    let keep: Vec<Event> = cur
                        .iter()
                        .enumerate()
                        .filter(|&(j, e)| !(i <= j && j < end && droppable(e)))
                        .map(|(_, e)| e.clone())
                        .collect();
                    if keep.len() < cur.len() && !check(rules, &keep, &starts) {
                        cur = keep;
                    } else {
                        i = end;
                    }
                }
                chunk /= 2;
            }
        }
        if (cur.len(), skipped) == before {
            return Witness {
                events: cur,
                skipped,
                starts,
            };
        }
    }
}

/// Positions `k` in `events` (sorted by invocation) where no operation is in progress: every
/// event before `k` ended before every event from `k` on began.
fn quiescent_cuts(events: &[Event]) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut max_ret = 0;
    for k in 1..events.len() {
        max_ret = max_ret.max(events[k - 1].ret);
        if max_ret < events[k].inv {
            cuts.push(k);
        }
    }
    cuts
}

fn refused_for_capacity(e: &Event) -> bool {
    match e.op {
        Op::TryInsert { .. } => e.res == Res::AtCapacity,
        Op::Insert { .. } => e.res == Res::Inserted(false),
        _ => false,
    }
}

/// The invariant and the defect that `witness` (cut by [`minimize`] from the non-linearizable
/// `history`) most likely shows: a tag (short, groups rounds) and a message starting with
/// `I<n> violated:`.
pub fn diagnose(spec: Spec, history: &[Event], witness: &Witness) -> (String, String) {
    let events = &witness.events[..];
    let close = events.iter().find(|e| e.op == Op::Close);
    // close() returned before the witness began.
    let closed_before = witness.starts.iter().all(|s| s.refusing && !s.draining);
    if close.is_some() || closed_before {
        let late: Vec<&Event> = events
            .iter()
            .filter(|e| closed_before || close.is_some_and(|c| e.inv > c.ret))
            .filter(|e| {
                matches!(
                    e.res,
                    Res::Conn(_) | Res::Found(Some(_)) | Res::Removed(true) | Res::Inserted(true)
                )
            })
            .collect();
        if let Some(late) = late.first() {
            let racer = events.iter().find(|e| {
                matches!(e.op, Op::TryInsert { .. } | Op::Insert { .. })
                    && matches!(e.res, Res::Conn(_) | Res::Inserted(true))
                    && close.is_some_and(|c| e.overlaps(c))
            });
            let why = match racer {
                Some(r) => format!(
                    "{} -> {} raced close() and left its connection pooled (issue 11 #1: \
                     try_insert checks is_closed() once, before placing)",
                    r.op, r.res
                ),
                None => {
                    // The insert that placed it, if it raced close(), may be before the witness.
                    let serial = match (late.op, &late.res) {
                        (_, Res::Conn(s) | Res::Found(Some(s))) => Some(*s),
                        (Op::RemoveConnection { serial, .. }, _) => Some(serial),
                        _ => None,
                    };
                    let close = history.iter().find(|e| e.op == Op::Close);
                    let placed = history.iter().find(|e| {
                        matches!(
                            (e.op, &e.res),
                            (Op::TryInsert { serial: s, .. }, Res::Conn(_))
                                | (Op::Insert { serial: s, .. }, Res::Inserted(true))
                                if Some(s) == serial
                        )
                    });
                    match (placed, close) {
                        (Some(p), Some(c)) if p.overlaps(c) => format!(
                            "t{} {} -> {} [{}, {}] raced close() [{}, {}] and left its connection \
                             pooled (issue 11 #1: try_insert checks is_closed() once, before \
                             placing)",
                            p.thread, p.op, p.res, p.inv, p.ret, c.inv, c.ret
                        ),
                        _ => "the pool still held a connection".to_string(),
                    }
                }
            };
            return (
                "I17: a connection pooled after close() returned (try_insert racing close: issue 11 #1)"
                    .to_string(),
                format!(
                    "I17 violated: {} invoked after close() returned gave {}; {why}",
                    late.op, late.res
                ),
            );
        }
    }
    if let Some(close) = close
        && let Some(refused) = events
            .iter()
            .find(|e| refused_for_capacity(e) && e.overlaps(close))
        && spec.lru
    {
        return (
            "I17: an insert racing close() refused for capacity instead of Closed".to_string(),
            format!(
                "I17 violated: {} -> {} racing close() with max_connections = {} under \
                 EvictLeastRecentlyUsed: no serial order has the pool full with nothing to evict \
                 (close() emptied the pool under the insert's eviction attempt); a caller racing \
                 close() must get Closed or a connection that the close then closes",
                refused.op, refused.res, spec.cap
            ),
        );
    }
    if let Some(refused) = events
        .iter()
        .find(|e| refused_for_capacity(e) && close.is_none_or(|c| e.ret <= c.inv))
    {
        let a = refused.addr();
        let remover = events.iter().find(|e| {
            matches!(e.res, Res::Found(Some(_)) | Res::Removed(true))
                && matches!(e.op, Op::Remove { .. } | Op::RemoveConnection { .. })
                && e.addr() == a
                && e.overlaps(refused)
        });
        if let Some(remover) = remover {
            return (
                "I2: try_insert racing remove of the same address refused at capacity (issue 11 #5)".to_string(),
                format!(
                    "I2 violated: {} -> {} while {} -> {} ran on the same address, max_connections \
                     = {}: in every serial order the address is present (replaced, never refused) or \
                     its slot is free (issue 11 #5: remove() releases the slot after dropping the \
                     shard lock)",
                    refused.op, refused.res, remover.op, remover.res, spec.cap
                ),
            );
        }
        if spec.lru {
            return (
                "I1: under EvictLeastRecentlyUsed an insert refused although a connection of another address could be evicted".to_string(),
                format!(
                    "I1 violated: {} -> {} with max_connections = {} under EvictLeastRecentlyUsed, \
                     in a state where another address's connection could have been evicted (no \
                     serial order explains the refusal: try_insert makes one attempt to make room, \
                     and gives up when that attempt finds nothing to evict, its victim taken by a \
                     racing remove or insert, or when a racing insert takes the slot it freed)",
                    refused.op, refused.res, spec.cap
                ),
            );
        }
        return (
            "I1: an insert refused for capacity below the cap".to_string(),
            format!(
                "I1 violated: {} -> {} although no serial order has the pool full \
                 (max_connections = {})",
                refused.op, refused.res, spec.cap
            ),
        );
    }
    if let Some(close) = close {
        // An insert racing close() whose connection is seen after close() began: placed after
        // close() had emptied its address.
        let observes = |e: &Event, s: Serial| match (e.op, &e.res) {
            (_, Res::Found(Some(x))) => *x == s,
            (Op::RemoveConnection { serial, .. }, Res::Removed(true)) => serial == s,
            _ => false,
        };
        for racer in events.iter().filter(|e| e.overlaps(close)) {
            let serial = match (racer.op, &racer.res) {
                (Op::TryInsert { serial, .. }, Res::Conn(_))
                | (Op::Insert { serial, .. }, Res::Inserted(true)) => serial,
                _ => continue,
            };
            if let Some(seen) = events
                .iter()
                .find(|e| e.ret > close.inv && observes(e, serial))
            {
                return (
                    "I17: a connection pooled after close() returned (try_insert racing close: issue 11 #1)"
                        .to_string(),
                    format!(
                        "I17 violated: {} -> {} saw #{serial}, which {} -> {} placed while close() \
                         ran, after close() had emptied its address (issue 11 #1: try_insert checks \
                         is_closed() once, before placing)",
                        seen.op, seen.res, racer.op, racer.res
                    ),
                );
            }
        }
    }
    if let Some(close) = close
        && let Some(racer) = events.iter().find(|e| {
            e.overlaps(close)
                && matches!(
                    (e.op, &e.res),
                    (Op::TryInsert { .. }, Res::Conn(_)) | (Op::Insert { .. }, Res::Inserted(true))
                )
        })
    {
        return (
            "I17: a connection pooled after close() returned (try_insert racing close: issue 11 #1)"
                .to_string(),
            format!(
                "I17 violated: no serial order explains these results, and {} -> {} raced close(): \
                 its connection was placed after close() had emptied the pool (issue 11 #1: \
                 try_insert checks is_closed() once, before placing)",
                racer.op, racer.res
            ),
        );
    }
    if spec.lru
        && check(
            Rules {
                spec,
                lenient_lru: true,
            },
            history,
            &[State::EMPTY],
        )
    {
        return (
            "I1: under EvictLeastRecentlyUsed an insert evicted a connection although the pool was no longer full".to_string(),
            format!(
                "I1 violated: under EvictLeastRecentlyUsed with max_connections = {}, a connection \
                 is gone that no serial order evicts: an insert of a new address evicted another \
                 address's connection after the pool had stopped being full (room made meanwhile \
                 by a removal, or by a racing insert of the same address that evicted too), so a \
                 connection was evicted for nothing; these results are linearizable only if an \
                 insert may evict whenever its address is absent",
                spec.cap
            ),
        );
    }
    (
        "I14: results no serial order explains".to_string(),
        "I14 violated: no serial order of these operations, consistent with real time, gives \
         these results (a get, remove or remove_connection saw a connection that was not, or no \
         longer, the pooled one)"
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(thread: usize, inv: u64, ret: u64, op: Op, res: Res) -> Event {
        Event {
            thread,
            inv,
            ret,
            op,
            res,
        }
    }

    const REJECT1: Spec = Spec { cap: 1, lru: false };

    #[test]
    fn sequential_histories() {
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(
                0,
                2,
                3,
                Op::TryInsert { addr: 1, serial: 2 },
                Res::AtCapacity,
            ),
            ev(0, 4, 5, Op::TryInsert { addr: 0, serial: 3 }, Res::Conn(3)),
            ev(0, 6, 7, Op::Get { addr: 0 }, Res::Found(Some(3))),
            ev(
                0,
                8,
                9,
                Op::RemoveConnection { addr: 0, serial: 1 },
                Res::Removed(false),
            ),
            ev(0, 10, 11, Op::Remove { addr: 0 }, Res::Found(Some(3))),
            ev(0, 12, 13, Op::Close, Res::Done),
            ev(0, 14, 15, Op::Get { addr: 0 }, Res::Found(None)),
            ev(0, 16, 17, Op::TryInsert { addr: 0, serial: 4 }, Res::Closed),
        ];
        assert!(linearizable(REJECT1, &h));
        let mut bad = h.clone();
        bad[1].res = Res::Conn(2);
        assert!(!linearizable(REJECT1, &bad), "beyond the cap");
        let mut bad = h.clone();
        bad[2].res = Res::AtCapacity;
        assert!(!linearizable(REJECT1, &bad), "I2");
        let mut bad = h;
        bad[7].res = Res::Found(Some(3));
        assert!(!linearizable(REJECT1, &bad), "after close");
    }

    #[test]
    fn overlapping_ops_may_take_either_order() {
        // remove racing try_insert of the same address: either order gives Ok.
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 5, Op::Remove { addr: 0 }, Res::Found(Some(1))),
            ev(1, 3, 6, Op::TryInsert { addr: 0, serial: 2 }, Res::Conn(2)),
            ev(1, 7, 8, Op::Get { addr: 0 }, Res::Found(Some(2))),
        ];
        assert!(linearizable(REJECT1, &h));
        let mut bad = h.clone();
        bad[2].res = Res::AtCapacity;
        bad[3].res = Res::Found(None);
        assert!(!linearizable(REJECT1, &bad));
        let small = minimize(REJECT1, &bad);
        assert_eq!(
            (small.skipped, small.events.len()),
            (1, 2),
            "the insert before is replaced by the state it leaves, the get is dropped: {small:?}"
        );
        assert!(
            diagnose(REJECT1, &bad, &small)
                .1
                .starts_with("I2 violated:")
        );
    }

    #[test]
    fn a_get_racing_close_may_see_the_connection_but_not_after_it() {
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 9, Op::Close, Res::Done),
            ev(1, 3, 4, Op::TryInsert { addr: 1, serial: 2 }, Res::Closed),
            ev(1, 5, 6, Op::Get { addr: 0 }, Res::Found(Some(1))),
            ev(1, 10, 11, Op::Get { addr: 0 }, Res::Found(None)),
        ];
        assert!(linearizable(REJECT1, &h));
        let mut bad = h.clone();
        bad[4].res = Res::Found(Some(1));
        assert!(!linearizable(REJECT1, &bad));
        // An insert racing close that lands after it: seen after close returned.
        let late = vec![
            ev(0, 0, 5, Op::Close, Res::Done),
            ev(1, 1, 6, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(1, 7, 8, Op::Get { addr: 0 }, Res::Found(Some(1))),
        ];
        assert!(!linearizable(REJECT1, &late));
        assert!(
            diagnose(REJECT1, &late, &minimize(REJECT1, &late))
                .1
                .starts_with("I17 violated:")
        );
    }

    #[test]
    fn close_drains_one_address_at_a_time() {
        let reject2 = Spec { cap: 2, lru: false };
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 3, Op::TryInsert { addr: 1, serial: 2 }, Res::Conn(2)),
            ev(0, 4, 20, Op::Close, Res::Done),
            ev(1, 5, 6, Op::Get { addr: 0 }, Res::Found(None)),
            ev(1, 7, 8, Op::Get { addr: 1 }, Res::Found(Some(2))),
        ];
        assert!(
            linearizable(reject2, &h),
            "a get racing close sees a0 gone, a1 not yet"
        );
        let mut bad = h;
        bad.push(ev(1, 9, 10, Op::Get { addr: 0 }, Res::Found(Some(1))));
        assert!(!linearizable(reject2, &bad), "a0 came back");
    }

    #[test]
    fn lru_makes_room_before_it_places_but_only_once() {
        let lru = Spec { cap: 1, lru: true };
        // The eviction of a0 is seen before a1 is placed.
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 9, Op::TryInsert { addr: 1, serial: 2 }, Res::Conn(2)),
            ev(1, 3, 4, Op::Get { addr: 0 }, Res::Found(None)),
            ev(1, 5, 6, Op::Get { addr: 1 }, Res::Found(None)),
            ev(1, 10, 11, Op::Get { addr: 1 }, Res::Found(Some(2))),
        ];
        assert!(linearizable(lru, &h));
        // Two racing inserts of a2 at cap 2 may evict only one of a0, a1.
        let lru2 = Spec { cap: 2, lru: true };
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 3, Op::TryInsert { addr: 1, serial: 2 }, Res::Conn(2)),
            ev(0, 4, 8, Op::TryInsert { addr: 2, serial: 3 }, Res::Conn(3)),
            ev(1, 5, 9, Op::TryInsert { addr: 2, serial: 4 }, Res::Conn(4)),
            ev(0, 10, 11, Op::Get { addr: 0 }, Res::Found(None)),
            ev(0, 12, 13, Op::Get { addr: 1 }, Res::Found(None)),
        ];
        assert!(!linearizable(lru2, &h));
        let w = minimize(lru2, &h);
        let d = diagnose(lru2, &h, &w);
        assert!(d.1.starts_with("I1 violated:"), "{d:?} {w:?}");
    }

    #[test]
    fn lru_evicts_some_other_address() {
        let lru = Spec { cap: 1, lru: true };
        let h = vec![
            ev(0, 0, 1, Op::TryInsert { addr: 0, serial: 1 }, Res::Conn(1)),
            ev(0, 2, 3, Op::TryInsert { addr: 1, serial: 2 }, Res::Conn(2)),
            ev(0, 4, 5, Op::Get { addr: 0 }, Res::Found(None)),
        ];
        assert!(linearizable(lru, &h));
        let mut bad = h;
        bad[1].res = Res::AtCapacity;
        bad[2].res = Res::Found(Some(1));
        assert!(!linearizable(lru, &bad));
    }
}
