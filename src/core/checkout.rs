//! [`CheckoutQueue`]: the exclusive-checkout state of one address, pure (issue 13).

use std::collections::VecDeque;
use std::time::Duration;

/// A waiting caller, unique within its queue. Ids grow with arrival, so FIFO order is id order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WaiterId(u64);

impl WaiterId {
    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// The limits a queue works within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckoutLimits {
    /// Connections of the address, idle + checked out + connecting (I19). At least 1.
    pub max_per_address: usize,
    /// Connects in flight at once for the address. At least 1; 1 keeps I4.
    pub max_connecting: usize,
}

/// What [`CheckoutQueue::acquire`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired<T> {
    /// An idle connection, now checked out to the caller.
    Ready(T),
    /// The caller waits as `waiter`. If `connect`, the queue counted a connect for it: start one
    /// (or call [`connect_not_started`](CheckoutQueue::connect_not_started)).
    Queued {
        /// The caller's place in line.
        waiter: WaiterId,
        /// Start a connect.
        connect: bool,
    },
}

/// Where a connection went.
#[derive(Debug, PartialEq, Eq)]
pub enum Placed<T> {
    /// To this waiter, which left the queue: it is now checked out to it. If the waiter has gone,
    /// [`release`](CheckoutQueue::release) it as the waiter's.
    Handed(WaiterId, T),
    /// Idle in the queue.
    Idle,
}

#[derive(Debug)]
struct Waiter {
    id: WaiterId,
    deadline: Duration,
}

/// The exclusive-checkout state of one address, pure (issue 13). Time is an offset from an origin
/// the caller keeps.
///
/// In exclusive mode every connection of an address is in exactly one place: idle in the queue,
/// checked out to one caller, or (before it exists) a connect in flight. Callers that find no idle
/// connection wait in FIFO order. The queue decides who gets what; the async layer around it owns
/// the channels and the clock, and the global capacity: when the queue asks for a connect, the
/// caller must still find a capacity slot for it (or give the request back with
/// [`connect_not_started`](CheckoutQueue::connect_not_started)).
///
/// A connection handed to a waiter that has gone (its receiver dropped) comes back to the async
/// layer, which [`release`](CheckoutQueue::release)s it as that waiter's: the waiter left the queue
/// when it was chosen, so the next one gets it, and nothing is lost (I22).
///
/// ```
/// use std::time::Duration;
/// use keyed_pool::core::{Acquired, CheckoutLimits, CheckoutQueue, Placed};
/// let limits = CheckoutLimits { max_per_address: 1, max_connecting: 1 };
/// let s = Duration::from_secs;
/// let mut q = CheckoutQueue::new();
/// // Nothing idle: the first caller waits and starts the connect; the second only waits (I19).
/// let Acquired::Queued { waiter: first, connect: true } = q.acquire(s(5), limits) else { panic!() };
/// let Acquired::Queued { waiter: second, connect: false } = q.acquire(s(5), limits) else { panic!() };
/// assert_eq!(q.connected("conn", s(0)), Placed::Handed(first, "conn"));
/// // The first caller is done: the connection goes to the next in line (I21), not to the idle list.
/// assert_eq!(q.release("conn", true, s(1)), Some(Placed::Handed(second, "conn")));
/// assert_eq!(q.release("conn", true, s(2)), Some(Placed::Idle));
/// assert_eq!(q.acquire(s(5), limits), Acquired::Ready("conn"));
/// ```
#[derive(Debug)]
pub struct CheckoutQueue<T> {
    /// Least recently returned first; hand-outs take the most recent (warm) end.
    idle: VecDeque<(T, Duration)>,
    checked_out: usize,
    connecting: usize,
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
}

impl<T> Default for CheckoutQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> CheckoutQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self {
            idle: VecDeque::new(),
            checked_out: 0,
            connecting: 0,
            waiters: VecDeque::new(),
            next_waiter: 0,
        }
    }

    /// A caller wants a connection and will wait until `deadline`. It gets an idle one only if
    /// nobody is waiting before it (I21); otherwise it joins the line, and a connect is counted for
    /// it when the line is longer than the connects in flight and the limits allow (I19).
    pub fn acquire(&mut self, deadline: Duration, limits: CheckoutLimits) -> Acquired<T> {
        if let Some(conn) = self.take_idle() {
            return Acquired::Ready(conn);
        }
        let id = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        self.waiters.push_back(Waiter { id, deadline });
        Acquired::Queued {
            waiter: id,
            connect: self.start_connect(limits),
        }
    }

    /// The most recently returned idle connection, now checked out to the caller, if one is idle:
    /// what [`acquire`](Self::acquire) tries first, for a caller that works out its deadline only
    /// when it has to wait (a hit pays for no deadline).
    pub fn take_idle(&mut self) -> Option<T> {
        // Nothing idles while someone waits (a connection coming back goes to the line first), so
        // an idle connection means an empty line: taking it overtakes nobody (I21).
        debug_assert!(self.idle.is_empty() || self.waiters.is_empty());
        let (conn, _) = self.idle.pop_back()?;
        self.checked_out += 1;
        Some(conn)
    }

    /// Counts a connect if one is wanted: more waiters than connects in flight, fewer connections
    /// than `max_per_address`, fewer connects than `max_connecting`. For the async layer after a
    /// discard, a failed connect or freed global capacity.
    pub fn start_connect(&mut self, limits: CheckoutLimits) -> bool {
        let wanted = self.waiters.len() > self.connecting
            && self.live() < limits.max_per_address.max(1)
            && self.connecting < limits.max_connecting.max(1);
        if wanted {
            self.connecting += 1;
        }
        wanted
    }

    /// A counted connect was never started (no global capacity for it): it stops counting. The
    /// waiters stay in line, for a returned connection or a later connect.
    pub fn connect_not_started(&mut self) {
        debug_assert!(self.connecting > 0, "no connect was counted");
        self.connecting = self.connecting.saturating_sub(1);
    }

    /// A counted connect failed. The first waiter, the one the connect was started for in FIFO
    /// order, is returned to be told why; the rest stay in line.
    pub fn connect_failed(&mut self) -> Option<WaiterId> {
        self.connect_not_started();
        self.pop_waiter().map(|w| w.id)
    }

    /// A counted connect made `conn` at `now`: it goes to the first waiter, or idles.
    pub fn connected(&mut self, conn: T, now: Duration) -> Placed<T> {
        self.connect_not_started();
        self.place(conn, now)
    }

    /// `conn` was checked out and is back at `now`. If `keep`, it goes to the first waiter or
    /// idles; if not (broken, unhealthy, past its lifetime) it is returned to be closed, and the
    /// result is `None`: call [`start_connect`](Self::start_connect) for the waiters it leaves.
    pub fn release(&mut self, conn: T, keep: bool, now: Duration) -> Option<Placed<T>> {
        debug_assert!(
            self.checked_out > 0,
            "a connection came back that was not checked out"
        );
        self.checked_out = self.checked_out.saturating_sub(1);
        if !keep {
            drop(conn);
            return None;
        }
        Some(self.place(conn, now))
    }

    /// A checked-out connection was closed instead of coming back (broken, unhealthy, past its
    /// lifetime, or judged unfit when it was about to be handed out): it stops counting. Like
    /// [`release`](Self::release) with `keep` false, for a caller that closes the connection
    /// itself. Call [`start_connect`](Self::start_connect) for the waiters it leaves.
    pub fn discard(&mut self) {
        debug_assert!(
            self.checked_out > 0,
            "a connection was discarded that was not checked out"
        );
        self.checked_out = self.checked_out.saturating_sub(1);
    }

    /// Gives a connection that is not checked out to the first waiter, or idles it as used at `now`.
    fn place(&mut self, conn: T, now: Duration) -> Placed<T> {
        match self.pop_waiter() {
            Some(waiter) => {
                self.checked_out += 1;
                Placed::Handed(waiter.id, conn)
            }
            None => {
                if self.idle.capacity() == 0 {
                    // Most addresses keep one connection: room for exactly one, where the first
                    // push would have made room for four (192 unused bytes per address, issue 13).
                    // Later pushes grow as usual.
                    self.idle.reserve_exact(1);
                }
                self.idle.push_back((conn, now));
                Placed::Idle
            }
        }
    }

    /// The first waiter leaves the line; the line's buffer is freed once it is empty, so an
    /// address whose callers waited once does not keep that buffer for as long as it idles.
    fn pop_waiter(&mut self) -> Option<Waiter> {
        let waiter = self.waiters.pop_front()?;
        self.release_empty_line();
        Some(waiter)
    }

    fn release_empty_line(&mut self) {
        if self.waiters.is_empty() && self.waiters.capacity() > 0 {
            self.waiters = VecDeque::new();
        }
    }

    /// A waiter gave up (dropped, or its own timeout fired): it leaves the line. `false` if it was
    /// not in line (already handed a connection, failed, or expired).
    pub fn cancel(&mut self, waiter: WaiterId) -> bool {
        match self.waiters.iter().position(|w| w.id == waiter) {
            Some(at) => {
                self.waiters.remove(at);
                self.release_empty_line();
                true
            }
            None => false,
        }
    }

    /// Removes and returns the waiters whose deadline has come by `now` (I16), oldest first.
    pub fn expire(&mut self, now: Duration) -> Vec<WaiterId> {
        let mut expired = Vec::new();
        self.waiters.retain(|w| {
            let due = w.deadline <= now;
            if due {
                expired.push(w.id);
            }
            !due
        });
        self.release_empty_line();
        expired
    }

    /// Takes the least recently used idle connection (to close it: idle eviction, or room for
    /// another address's waiter).
    pub fn take_least_recently_used(&mut self) -> Option<(T, Duration)> {
        self.idle.pop_front()
    }

    /// When the least recently used idle connection was returned, to choose across addresses.
    pub fn least_recently_used_at(&self) -> Option<Duration> {
        self.idle.front().map(|(_, at)| *at)
    }

    /// Takes every idle connection returned at or before `cutoff` (idle eviction), least recently
    /// used first.
    pub fn take_idle_since(&mut self, cutoff: Duration) -> Vec<T> {
        let mut taken = Vec::new();
        while self.idle.front().is_some_and(|(_, at)| *at <= cutoff) {
            if let Some((conn, _)) = self.idle.pop_front() {
                taken.push(conn);
            }
        }
        taken
    }

    /// Takes every idle connection for which `take(conn, returned_at)` holds (idle eviction, a
    /// closed transport, past its lifetime), least recently used first; the others stay in order.
    pub fn take_idle_where(&mut self, mut take: impl FnMut(&T, Duration) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.idle.len());
        for (conn, at) in self.idle.drain(..) {
            if take(&conn, at) {
                taken.push(conn);
            } else {
                kept.push_back((conn, at));
            }
        }
        self.idle = kept;
        taken
    }

    /// The idle connections with when each was returned, least recently used first.
    pub fn idle_iter(&self) -> impl Iterator<Item = (&T, Duration)> {
        self.idle.iter().map(|(conn, at)| (conn, *at))
    }

    /// `true` when the queue holds nothing: no connection idle, checked out or connecting, and
    /// nobody in line.
    pub fn is_empty(&self) -> bool {
        self.live() == 0 && self.waiters.is_empty()
    }

    /// Idle connections.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Connections checked out.
    pub fn checked_out(&self) -> usize {
        self.checked_out
    }

    /// Connects counted and not yet finished.
    pub fn connecting(&self) -> usize {
        self.connecting
    }

    /// Callers in line.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Connections of the address: idle, checked out and connecting (I19 bounds it).
    pub fn live(&self) -> usize {
        self.idle.len() + self.checked_out + self.connecting
    }

    /// The first waiter in line, if any.
    pub fn first_waiter(&self) -> Option<WaiterId> {
        self.waiters.front().map(|w| w.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: CheckoutLimits = CheckoutLimits {
        max_per_address: 2,
        max_connecting: 1,
    };
    const S: Duration = Duration::from_secs(1);

    fn queued(a: Acquired<u32>) -> (WaiterId, bool) {
        match a {
            Acquired::Queued { waiter, connect } => (waiter, connect),
            Acquired::Ready(c) => panic!("expected to wait, got connection {c}"),
        }
    }

    #[test]
    fn i19_connects_stop_at_the_per_address_cap_and_at_one_in_flight() {
        let mut q = CheckoutQueue::new();
        let (w0, c0) = queued(q.acquire(S, LIMITS));
        let (_, c1) = queued(q.acquire(S, LIMITS));
        assert!(c0 && !c1, "I4: one connect in flight");
        assert_eq!(q.connected(10, S), Placed::Handed(w0, 10));
        assert!(q.start_connect(LIMITS), "the second waiter gets a connect");
        assert_eq!(q.live(), 2);
        let (_, c2) = queued(q.acquire(S, LIMITS));
        assert!(!c2, "I19: 2 connections is the cap");
        assert!(!q.start_connect(LIMITS));
    }

    #[test]
    fn i19_the_per_address_cap_binds_when_connects_may_run_in_parallel() {
        let limits = CheckoutLimits {
            max_per_address: 2,
            max_connecting: 3,
        };
        let mut q = CheckoutQueue::<u32>::new();
        assert!(!q.start_connect(limits), "no connect for an empty line");
        let connects: Vec<bool> = (0..3).map(|_| queued(q.acquire(S, limits)).1).collect();
        assert_eq!(
            connects,
            [true, true, false],
            "I19: two connections at most"
        );
        assert_eq!(q.connecting(), 2);
        // As many connects as waiters, no more: the third waiter's connect is refused by the cap,
        // and once a connect is given back a waiter without one gets it.
        assert!(!q.start_connect(limits));
        q.connect_not_started();
        assert!(q.start_connect(limits));
        assert!(
            !q.start_connect(limits),
            "2 connects for 3 waiters at a cap of 2"
        );
    }

    #[test]
    fn the_counts_follow_each_step() {
        let mut q = CheckoutQueue::new();
        let counts = |q: &CheckoutQueue<u32>| {
            [
                q.idle(),
                q.checked_out(),
                q.connecting(),
                q.waiting(),
                q.live(),
            ]
        };
        let (w0, _) = queued(q.acquire(S, LIMITS));
        queued(q.acquire(S, LIMITS));
        assert_eq!(
            counts(&q),
            [0, 0, 1, 2, 1],
            "[idle, out, connecting, waiting, live]"
        );
        assert_eq!(q.connected(1, S), Placed::Handed(w0, 1));
        assert!(q.start_connect(LIMITS));
        assert_eq!(counts(&q), [0, 1, 1, 1, 2]);
        assert!(matches!(q.connected(2, S), Placed::Handed(_, 2)));
        assert_eq!(q.release(1, true, S), Some(Placed::Idle));
        assert_eq!(counts(&q), [1, 1, 0, 0, 2]);
    }

    #[test]
    fn waiter_ids_count_arrivals_from_zero() {
        let mut q = CheckoutQueue::<u32>::new();
        let ids: Vec<u64> = (0..3)
            .map(|_| queued(q.acquire(S, LIMITS)).0.get())
            .collect();
        assert_eq!(ids, [0, 1, 2]);
    }

    #[test]
    fn i21_a_late_caller_never_overtakes_one_in_line() {
        let mut q = CheckoutQueue::new();
        let (w0, _) = queued(q.acquire(S, LIMITS));
        assert_eq!(q.connected(7, S), Placed::Handed(w0, 7));
        let (w1, _) = queued(q.acquire(S, LIMITS));
        q.connect_not_started();
        // 7 comes back: w1 gets it; a caller arriving now waits behind nobody and finds none idle.
        assert_eq!(q.release(7, true, S), Some(Placed::Handed(w1, 7)));
        let (w2, _) = queued(q.acquire(S, LIMITS));
        assert!(w2 > w1);
        assert_eq!(q.release(7, true, S), Some(Placed::Handed(w2, 7)));
    }

    #[test]
    fn i22_a_connection_for_a_gone_waiter_goes_to_the_next() {
        let mut q = CheckoutQueue::new();
        let (w0, _) = queued(q.acquire(S, LIMITS));
        let (w1, _) = queued(q.acquire(S, LIMITS));
        let Placed::Handed(to, conn) = q.connected(1, S) else {
            panic!()
        };
        assert_eq!(to, w0);
        // w0's receiver is gone: the async layer's send fails and hands the connection back.
        assert_eq!(q.release(conn, true, S), Some(Placed::Handed(w1, 1)));
        assert_eq!(q.checked_out(), 1);
    }

    #[test]
    fn a_failed_connect_fails_the_first_waiter_only() {
        let mut q = CheckoutQueue::<u32>::new();
        let (w0, _) = queued(q.acquire(S, LIMITS));
        let (w1, _) = queued(q.acquire(S, LIMITS));
        assert_eq!(q.connect_failed(), Some(w0));
        assert_eq!(q.first_waiter(), Some(w1));
        assert_eq!(q.connecting(), 0);
    }

    #[test]
    fn i16_waiters_expire_at_their_deadline_and_cancel_leaves_the_line() {
        let mut q = CheckoutQueue::<u32>::new();
        let (w0, _) = queued(q.acquire(S, LIMITS));
        let (w1, _) = queued(q.acquire(3 * S, LIMITS));
        let (w2, _) = queued(q.acquire(2 * S, LIMITS));
        assert!(q.expire(S - Duration::from_nanos(1)).is_empty());
        assert_eq!(q.expire(2 * S), vec![w0, w2]);
        assert!(q.cancel(w1));
        assert!(!q.cancel(w1), "already gone");
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn idle_hand_outs_take_the_warmest_and_eviction_the_coldest() {
        let limits = CheckoutLimits {
            max_per_address: 3,
            max_connecting: 3,
        };
        let mut q = CheckoutQueue::new();
        for _ in 0..3 {
            assert!(queued(q.acquire(S, limits)).1, "a connect for each waiter");
        }
        for conn in 1..=3 {
            assert!(matches!(q.connected(conn, S), Placed::Handed(_, c) if c == conn));
        }
        for (conn, at) in [(1, 1), (2, 2), (3, 3)] {
            assert_eq!(q.release(conn, true, at * S), Some(Placed::Idle));
        }
        assert_eq!(q.least_recently_used_at(), Some(S));
        assert_eq!(q.take_idle_since(S), vec![1]);
        assert_eq!(q.acquire(S, limits), Acquired::Ready(3));
        assert_eq!(q.take_least_recently_used(), Some((2, 2 * S)));
        assert_eq!(q.release(3, false, S), None);
        assert_eq!(q.live(), 0);
        assert!(q.is_empty());
    }

    #[test]
    fn take_idle_where_keeps_the_order_of_what_stays() {
        let limits = CheckoutLimits {
            max_per_address: 4,
            max_connecting: 4,
        };
        let mut q = CheckoutQueue::new();
        for _ in 0..4 {
            queued(q.acquire(S, limits));
        }
        for conn in 1..=4 {
            q.connected(conn, S);
        }
        for conn in 1..=4 {
            q.release(conn, true, conn * S);
        }
        assert_eq!(q.take_idle_where(|&c, _| c % 2 == 0), vec![2, 4]);
        assert_eq!(q.idle_iter().map(|(c, _)| *c).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(q.take_idle_where(|_, at| at <= S), vec![1]);
        assert_eq!((q.idle(), q.live(), q.is_empty()), (1, 1, false));
        assert_eq!(q.acquire(S, limits), Acquired::Ready(3));
        q.discard();
        assert!(q.is_empty(), "I22: a discarded connection stops counting");
    }

    /// Issue 13 (memory per idle exclusive connection): the first idle connection takes room for
    /// one, not four, and the line's buffer is freed once the line empties, whichever way it
    /// empties (a hand-out, a cancel, an expiry, a failed connect).
    #[test]
    fn an_idle_address_keeps_room_for_one_connection_and_no_line_buffer() {
        let mut q = CheckoutQueue::new();
        let (w0, _) = queued(q.acquire(S, LIMITS));
        assert!(q.waiters.capacity() > 0);
        assert_eq!(q.connected(1, S), Placed::Handed(w0, 1));
        assert_eq!(q.waiters.capacity(), 0, "a hand-out emptied the line");
        assert_eq!(q.release(1, true, S), Some(Placed::Idle));
        assert_eq!(q.idle.capacity(), 1, "room for exactly the first idle one");
        assert_eq!(q.acquire(S, LIMITS), Acquired::Ready(1));
        // Each of these waiters was counted a connect (one of two connections is out): given
        // back, as the async layer does when its waiter leaves before the connect starts.
        let (w1, connect) = queued(q.acquire(S, LIMITS));
        assert!(connect);
        q.connect_not_started();
        assert!(q.cancel(w1));
        assert_eq!(q.waiters.capacity(), 0, "a cancel emptied the line");
        assert!(queued(q.acquire(S, LIMITS)).1);
        q.connect_not_started();
        assert_eq!(q.expire(S).len(), 1);
        assert_eq!(q.waiters.capacity(), 0, "an expiry emptied the line");
        let (w3, connect) = queued(q.acquire(S, LIMITS));
        assert!(connect);
        assert_eq!(q.connect_failed(), Some(w3));
        assert_eq!(q.waiters.capacity(), 0, "a failed connect emptied the line");
        assert_eq!(q.release(1, true, S), Some(Placed::Idle));
        assert_eq!((q.live(), q.idle(), q.idle.capacity()), (1, 1, 1));
    }
}
