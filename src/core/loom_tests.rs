//! The loom tier: every interleaving (up to `LOOM_MAX_PREEMPTIONS` preemptions per execution) of
//! 2–3 threads for each pair of operations of the core that can race, each checked against a
//! numbered invariant. Run by `scripts/loom.sh` (`--cfg loom`, release mode); see
//! `docs/TESTING-loom.md` for what each test catches.
//!
//! Under loom the atomics and the mutex of `crate::sync` are loom's: they exist only inside
//! `loom::model`, so everything here is built inside the model closure. The `Arc`s are std's (loom
//! need not track them: see `crate::sync`).

use std::sync::Arc;
use std::time::Duration;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use tokio::time::Instant;

use crate::ConnectionMetrics;
use crate::core::{CallClaim, CallRecord, CapacityLedger, HealthPolicy, Permit, Verdict};

/// Runs `f` under loom and prints how many executions it explored and how long it took (also when
/// it fails: the line then says at which execution).
fn model<F>(name: &str, f: F)
where
    F: Fn() + Send + Sync + 'static,
{
    struct Report<'a> {
        name: &'a str,
        runs: Arc<std::sync::atomic::AtomicUsize>,
        start: std::time::Instant,
    }
    impl Drop for Report<'_> {
        fn drop(&mut self) {
            let runs = self.runs.load(std::sync::atomic::Ordering::Relaxed);
            let took = self.start.elapsed();
            if std::thread::panicking() {
                eprintln!(
                    "loom: {}: FAILED at execution {runs} after {took:.2?}",
                    self.name
                );
            } else {
                eprintln!("loom: {}: {runs} executions in {took:.2?}", self.name);
            }
        }
    }
    let report = Report {
        name,
        runs: Arc::default(),
        start: std::time::Instant::now(),
    };
    let runs = Arc::clone(&report.runs);
    loom::model(move || {
        runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
}

// ---------------------------------------------------------------------------------------------
// reserve vs release: `CapacityLedger::try_acquire` and `Permit::drop`
// ---------------------------------------------------------------------------------------------

/// `threads` threads each try to take a slot of a ledger of `max`, hold it, and drop it. Besides
/// the ledger's own count, `held` counts the permits alive (incremented after a permit is taken,
/// decremented before it is dropped), so it never exceeds the permits that exist.
fn reserve_release(max: usize, threads: usize) {
    let ledger = Arc::new(CapacityLedger::new(max));
    let held = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let held = Arc::clone(&held);
            thread::spawn(move || {
                let permit = ledger.try_acquire()?;
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                assert!(
                    now <= max,
                    "I1 violated: {now} permits alive at once under max = {max}"
                );
                let used = ledger.used();
                assert!(
                    (1..=max).contains(&used),
                    "I1 violated: a permit holder reads used = {used} under max = {max}"
                );
                held.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
                Some(())
            })
        })
        .collect();
    let taken = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap())
        .count();
    // The first try_acquire in the count's modification order reads 0 < max: it cannot be refused.
    assert!(
        taken >= 1,
        "I1 violated: every try_acquire refused on an empty ledger of max = {max}"
    );
    if threads <= max {
        assert_eq!(
            taken, threads,
            "I1 violated: {threads} takers under max = {max}, only {taken} served"
        );
    }
    assert_eq!(
        ledger.used(),
        0,
        "I3 violated: every permit dropped, yet {} slot(s) still counted",
        ledger.used()
    );
}

/// I1, I3: cap 1, three threads reserving and releasing at once.
#[test]
fn loom_reserve_vs_release_cap1_three_threads() {
    model("reserve_vs_release_cap1_three_threads", || {
        reserve_release(1, 3)
    });
}

/// I1, I3: cap 2, three threads (one more than fits) reserving and releasing at once.
#[test]
fn loom_reserve_vs_release_cap2_three_threads() {
    model("reserve_vs_release_cap2_three_threads", || {
        reserve_release(2, 3)
    });
}

/// I1, I3: cap 2, two threads: both must be served in every interleaving (demand within max).
#[test]
fn loom_reserve_vs_release_cap2_two_threads() {
    model("reserve_vs_release_cap2_two_threads", || {
        reserve_release(2, 2)
    });
}

/// I1 with the permits kept: the ledger is full (`max` permits held); one thread drops one of
/// them while two takers try to take a slot and keep what they get. One slot was freed, so at most
/// one taker is served, whatever the interleaving; and once every permit is dropped, nothing is
/// counted (I3).
fn one_freed_slot_two_takers(max: usize) {
    let ledger = Arc::new(CapacityLedger::new(max));
    let mut permits: Vec<_> = (0..max)
        .map(|_| ledger.try_acquire().expect("the ledger starts empty"))
        .collect();
    let freer = {
        let permit = permits.pop().unwrap();
        thread::spawn(move || drop(permit))
    };
    let takers: Vec<_> = (0..2)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            thread::spawn(move || ledger.try_acquire())
        })
        .collect();
    freer.join().unwrap();
    let taken: Vec<Permit> = takers
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert!(
        taken.len() <= 1,
        "I1 violated: one slot freed under max = {max}, {} takers served",
        taken.len()
    );
    assert_eq!(
        ledger.used(),
        permits.len() + taken.len(),
        "I1 violated: the count is not the permits alive"
    );
    drop(taken);
    drop(permits);
    assert_eq!(ledger.used(), 0, "I3 violated: a slot leaked");
}

/// I1, I3: cap 1, a release racing two takes that keep their permits.
#[test]
fn loom_one_freed_slot_two_takers_cap1() {
    model("one_freed_slot_two_takers_cap1", || {
        one_freed_slot_two_takers(1)
    });
}

/// I1, I3: cap 2, a release racing two takes that keep their permits.
#[test]
fn loom_one_freed_slot_two_takers_cap2() {
    model("one_freed_slot_two_takers_cap2", || {
        one_freed_slot_two_takers(2)
    });
}

/// The last slot kept (`CapacityLedger::reserve_last`, what the pool's room-maker holds): the
/// ledger is full (`max` permits); the holder reserves the last slot, then one thread drops a
/// permit while a racer tries to take a slot. The freed slot is the holder's in every
/// interleaving: the racer is refused, and once the freer is done the holder's take succeeds, so
/// making room cannot be starved by remove-and-insert churn (I1, linearizable).
fn last_slot_kept_from_a_racer(max: usize) {
    let ledger = Arc::new(CapacityLedger::new(max));
    let mut permits: Vec<_> = (0..max)
        .map(|_| ledger.try_acquire().expect("the ledger starts empty"))
        .collect();
    let last = ledger
        .reserve_last()
        .expect("nobody else holds the last slot");
    let freer = {
        let permit = permits.pop().unwrap();
        thread::spawn(move || drop(permit))
    };
    let racer = {
        let ledger = Arc::clone(&ledger);
        thread::spawn(move || ledger.try_acquire())
    };
    let raced = racer.join().unwrap();
    assert!(
        raced.is_none(),
        "I1 violated: the last slot, kept for the room-maker, went to a racer (max = {max})"
    );
    freer.join().unwrap();
    let taken = last
        .try_acquire()
        .expect("I1 violated: a slot freed while kept for the holder did not come to it");
    assert_eq!(
        ledger.used(),
        max,
        "I1 violated: the count is not the permits alive"
    );
    drop(last);
    drop(taken);
    drop(permits);
    assert_eq!(ledger.used(), 0, "I3 violated: a slot leaked");
}

/// I1, I3: cap 1, a release racing a take while the last slot is kept.
#[test]
fn loom_last_slot_kept_from_a_racer_cap1() {
    model("last_slot_kept_from_a_racer_cap1", || {
        last_slot_kept_from_a_racer(1)
    });
}

/// I1, I3: cap 2, a release racing a take while the last slot is kept.
#[test]
fn loom_last_slot_kept_from_a_racer_cap2() {
    model("last_slot_kept_from_a_racer_cap2", || {
        last_slot_kept_from_a_racer(2)
    });
}

/// No spurious refusal: a slot whose release *happens before* a `try_acquire` (here through a
/// release/acquire flag) is acquirable. The ledger is full (`max` permits held); thread A drops one
/// and raises the flag; thread B reads the flag, then tries. If B saw the flag, the count its CAS
/// loop reads is at most `max - 1`, so a refusal would be spurious. (Without that ordering a
/// refusal is legitimate: B's try may come first.) A third thread C drops another permit with no
/// flag, so B's read can also see that release or not.
fn freed_slot_is_acquirable(max: usize) {
    let ledger = Arc::new(CapacityLedger::new(max));
    let mut permits: Vec<_> = (0..max)
        .map(|_| ledger.try_acquire().expect("the ledger starts empty"))
        .collect();
    assert!(ledger.try_acquire().is_none(), "I1 violated: max + 1 taken");
    let released = Arc::new(AtomicBool::new(false));
    let freer = {
        let released = Arc::clone(&released);
        let permit = permits.pop().unwrap();
        thread::spawn(move || {
            drop(permit);
            released.store(true, Ordering::Release);
        })
    };
    let other = (max >= 2).then(|| {
        let permit = permits.pop().unwrap();
        thread::spawn(move || drop(permit))
    });
    let taker = {
        let ledger = Arc::clone(&ledger);
        let released = Arc::clone(&released);
        thread::spawn(move || {
            let saw_release = released.load(Ordering::Acquire);
            let got = ledger.try_acquire();
            assert!(
                !saw_release || got.is_some(),
                "I1 violated (spurious refusal): a slot was freed before try_acquire, yet it was refused (max = {max})"
            );
            got.is_some()
        })
    };
    freer.join().unwrap();
    if let Some(other) = other {
        other.join().unwrap();
    }
    taker.join().unwrap();
    drop(permits);
    assert_eq!(ledger.used(), 0, "I3 violated: a slot leaked");
}

/// I1 (no spurious refusal), I3: cap 1, a release racing a take.
#[test]
fn loom_freed_slot_is_acquirable_cap1() {
    model("freed_slot_is_acquirable_cap1", || {
        freed_slot_is_acquirable(1)
    });
}

/// I1 (no spurious refusal), I3: cap 2, two releases racing a take.
#[test]
fn loom_freed_slot_is_acquirable_cap2() {
    model("freed_slot_is_acquirable_cap2", || {
        freed_slot_is_acquirable(2)
    });
}

// ---------------------------------------------------------------------------------------------
// claim vs retire: `CallClaim::call_started`/`call_ended` vs `try_retire`
// ---------------------------------------------------------------------------------------------

/// I5 as the pool uses it: `begin` is `call_started`; the sweep removes a connection only if its
/// `try_retire` succeeded. The claim word orders the two: a retire succeeds only if it comes first,
/// and then the call's start comes after it, so the caller, looking after starting, sees the
/// connection retired. So: `retired ⇔ A saw retired after starting` (the retire's predicate is
/// `true`, so a claim once made is kept), and the call stays counted either way.
#[test]
fn loom_claim_vs_retire() {
    model("claim_vs_retire", || {
        let claim = Arc::new(CallClaim::default());
        let caller = {
            let claim = Arc::clone(&claim);
            thread::spawn(move || {
                claim.call_started();
                let saw_retired = claim.is_retired();
                let in_flight = claim.in_flight();
                assert!(
                    in_flight >= 1,
                    "I5 violated: a started call is not counted ({in_flight} in flight)"
                );
                saw_retired
            })
        };
        let sweeper = {
            let claim = Arc::clone(&claim);
            thread::spawn(move || claim.try_retire(|| true))
        };
        let saw_retired = caller.join().unwrap();
        let retired = sweeper.join().unwrap();
        assert_eq!(
            retired, saw_retired,
            "I5 violated: retire succeeded = {retired}, but the call that started saw retired = {saw_retired}"
        );
        assert_eq!(
            claim.in_flight(),
            1,
            "I5 violated: the call in flight was lost"
        );
        assert_eq!(claim.is_retired(), retired, "I5 violated: claim word");
    });
}

/// I5: a call that runs to its end races two sweeps, one whose idle predicate holds and one whose
/// predicate fails (so it gives its claim back, while the call may be starting). No claim, kept or
/// given back, overwrites or loses the call's count: the count is at least 1 while the call is in
/// flight and ends at 0, the predicate that failed never retires, and the retired bit at the end
/// is exactly the successful retire.
#[test]
fn loom_claim_vs_two_retires() {
    model("claim_vs_two_retires", || {
        let claim = Arc::new(CallClaim::default());
        let caller = {
            let claim = Arc::clone(&claim);
            thread::spawn(move || {
                claim.call_started();
                let in_flight = claim.in_flight();
                assert!(
                    in_flight >= 1,
                    "I5 violated: a started call is not counted ({in_flight} in flight)"
                );
                claim.call_ended();
            })
        };
        let idle = {
            let claim = Arc::clone(&claim);
            thread::spawn(move || claim.try_retire(|| true))
        };
        let busy = {
            let claim = Arc::clone(&claim);
            thread::spawn(move || claim.try_retire(|| false))
        };
        caller.join().unwrap();
        let retired = idle.join().unwrap();
        assert!(
            !busy.join().unwrap(),
            "I5 violated: a retire whose predicate failed succeeded"
        );
        assert_eq!(
            claim.in_flight(),
            0,
            "I5 violated: the in-flight count ended at {} (a claim overwrote a call)",
            claim.in_flight()
        );
        assert_eq!(
            claim.is_retired(),
            retired,
            "I5 violated: retired bit {} but the retire returned {retired}",
            claim.is_retired()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// the idle clock: `ConnectionMetrics::touch` (fetch_max) vs touch vs retire
// ---------------------------------------------------------------------------------------------

const MS: Duration = Duration::from_millis(1);

/// I7: two touches of different instants from two threads, a third thread reading the clock twice.
/// The clock never goes back (the reader's second read is not older than its first) and ends at the
/// later touch, whatever order they landed in.
#[test]
fn loom_touch_vs_touch() {
    let t0 = Instant::now();
    model("touch_vs_touch", move || {
        let m = Arc::new(ConnectionMetrics::new(t0, HealthPolicy::default()));
        let early = t0 + 10 * MS;
        let late = t0 + 20 * MS;
        let touches: Vec<_> = [late, early]
            .into_iter()
            .map(|at| {
                let m = Arc::clone(&m);
                thread::spawn(move || m.touch(at))
            })
            .collect();
        let reader = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                let first = m.last_used();
                let second = m.last_used();
                assert!(
                    second >= first,
                    "I7 violated: the idle clock went back from {:?} to {:?}",
                    first - t0,
                    second - t0
                );
            })
        };
        for t in touches {
            t.join().unwrap();
        }
        reader.join().unwrap();
        assert_eq!(
            m.last_used(),
            late,
            "I7 violated: the idle clock ended at {:?}, not at the latest use {:?}",
            m.last_used() - t0,
            late - t0
        );
    });
}

/// I5, I7: a call that finishes (records its success at `t0 + 95 ms`, then ends) races a sweep at
/// `t0 + 100 ms` with `max_idle = 50 ms`, and a `get` touching an earlier instant (`t0 + 40 ms`)
/// on a third thread. The call started at `t0` (before the threads), so the connection is in flight
/// until the call ends, and used 5 ms before the sweep once it has: the retire must fail in every
/// interleaving. It can claim only after the call's end in the claim word's order, and the call
/// recorded (moved the clock) before ending, so the sweep's read of the clock sees that use, and the
/// earlier touch cannot take the clock back past it.
#[test]
fn loom_finished_call_vs_touch_vs_retire() {
    let t0 = Instant::now();
    model("finished_call_vs_touch_vs_retire", move || {
        let m = Arc::new(ConnectionMetrics::new(t0, HealthPolicy::default()));
        m.call_started();
        let caller = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                m.record_success_at(t0 + 95 * MS, 95 * MS);
                m.call_ended();
            })
        };
        let getter = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.touch(t0 + 40 * MS))
        };
        let sweeper = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.try_retire_idle(t0 + 100 * MS, Some(50 * MS)))
        };
        caller.join().unwrap();
        getter.join().unwrap();
        let retired = sweeper.join().unwrap();
        assert!(
            !retired,
            "I5 violated: retired a connection in flight or used 5 ms before the sweep (max_idle 50 ms); clock at {:?}",
            m.last_used() - t0
        );
        assert_eq!(m.in_flight(), 0, "I5 violated: in-flight count");
        assert_eq!(
            m.last_used(),
            t0 + 95 * MS,
            "I7 violated: the idle clock is not at the latest use"
        );
    });
}

/// How `MarkFolds` reaches a connection held by an `Arc` (the sweep holds a map entry instead).
fn arc_metrics(m: &Arc<ConnectionMetrics>) -> Option<&ConnectionMetrics> {
    Some(m)
}

/// I5 for the chunked fold (issue 16): a sweep's look takes the "used" marks of two connections,
/// then reads the clock once and folds both at that reading, while a `get` on the second one reads
/// the clock (the instant it is used at) and marks it. The clock is modelled as a counter each
/// reading increments (a reading is a step of the model, as a real clock read is). In every
/// interleaving the `get`'s use is either still marked (it came after the clear, for a later fold)
/// or in the clock at an instant not earlier than the `get`'s: never recorded as earlier than it
/// happened. The first connection, marked before the threads start, is folded exactly at the
/// sweep's reading.
#[test]
fn loom_chunk_fold_vs_get() {
    use crate::metrics::MarkFolds;
    let t0 = Instant::now();
    model("chunk_fold_vs_get", move || {
        let clock = Arc::new(loom::sync::atomic::AtomicU64::new(1));
        let read = move |clock: &loom::sync::atomic::AtomicU64| {
            t0 + MS * u32::try_from(clock.fetch_add(1, Ordering::SeqCst)).unwrap()
        };
        let first = Arc::new(ConnectionMetrics::new(t0, HealthPolicy::default()));
        let second = Arc::new(ConnectionMetrics::new(t0, HealthPolicy::default()));
        first.mark_used();
        second.mark_used();
        let getter = {
            let (second, clock) = (Arc::clone(&second), Arc::clone(&clock));
            thread::spawn(move || {
                let used_at = read(&clock);
                second.mark_used();
                used_at
            })
        };
        let sweeper = {
            let (first, second, clock) =
                (Arc::clone(&first), Arc::clone(&second), Arc::clone(&clock));
            thread::spawn(move || {
                let mut folds = MarkFolds::with_chunk(t0, arc_metrics, 8);
                assert!(folds.take(first).is_none(), "the first one was marked");
                let _ = folds.take(second);
                let at = read(&clock);
                folds.fold_at(at);
                at
            })
        };
        let used_at = getter.join().unwrap();
        let folded_at = sweeper.join().unwrap();
        assert_eq!(
            first.last_used(),
            folded_at,
            "I5 violated: a taken mark was not folded at the chunk's reading"
        );
        assert!(
            second.pending_use() || second.last_used() >= used_at,
            "I5 violated: a get at {:?} was folded at {:?}, earlier than it happened",
            used_at - t0,
            second.last_used() - t0
        );
    });
}

// ---------------------------------------------------------------------------------------------
// record vs record, record vs verdict: the `CallRecord` under `crate::sync::Mutex`
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    Success,
    Failure,
}

/// What one serial order of the threads' operations gives: the record at the end and, per thread,
/// the verdict each of its failures returned.
#[derive(Debug, PartialEq)]
struct Serial {
    order: Vec<usize>,
    record: CallRecord,
    verdicts: Vec<Vec<Verdict>>,
}

/// Every interleaving of the threads' sequences (each thread's own order kept), replayed serially
/// on a fresh record.
fn serial_orders(threads: &[Vec<Op>], policy: &HealthPolicy, at: Duration) -> Vec<Serial> {
    fn merges(left: &mut Vec<usize>, prefix: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if left.iter().all(|&n| n == 0) {
            out.push(prefix.clone());
            return;
        }
        for t in 0..left.len() {
            if left[t] > 0 {
                left[t] -= 1;
                prefix.push(t);
                merges(left, prefix, out);
                prefix.pop();
                left[t] += 1;
            }
        }
    }
    let mut orders = Vec::new();
    merges(
        &mut threads.iter().map(Vec::len).collect(),
        &mut Vec::new(),
        &mut orders,
    );
    orders
        .into_iter()
        .map(|order| {
            let mut record = CallRecord::default();
            let mut next = vec![0; threads.len()];
            let mut verdicts = vec![Vec::new(); threads.len()];
            for &t in &order {
                match threads[t][next[t]] {
                    Op::Success => record.success(policy, at, MS),
                    Op::Failure => verdicts[t].push(record.failure(policy, at)),
                }
                next[t] += 1;
            }
            Serial {
                order,
                record,
                verdicts,
            }
        })
        .collect()
}

/// Runs each thread's operations through `ConnectionMetrics` at once, then checks that what the
/// connection reports (counts, the failure run, the latch and its reason, and the verdict each
/// failure returned) is what some serial order of those operations gives:
/// - I13: no count lost (successes and failures equal every serial order's);
/// - I10: `consecutive_errors` equals the trailing failure run of the serial order the record took
///   (an order whose replay gives exactly the record);
/// - I9: the latch, its stored reason, `is_healthy`, `unusable_reason` and every verdict returned
///   agree with that same serial order.
fn record_vs_record(name: &str, threads: Vec<Vec<Op>>, policy: HealthPolicy) {
    let t0 = Instant::now();
    let at = 5 * MS;
    let serials = Arc::new(serial_orders(&threads, &policy, at));
    let threads = Arc::new(threads);
    model(name, move || {
        let m = Arc::new(ConnectionMetrics::new(t0, policy));
        let handles: Vec<_> = (0..threads.len())
            .map(|t| {
                let m = Arc::clone(&m);
                let threads = Arc::clone(&threads);
                thread::spawn(move || {
                    let mut verdicts = Vec::new();
                    for op in &threads[t] {
                        match op {
                            Op::Success => m.record_success_at(t0 + at, MS),
                            Op::Failure => verdicts.push(m.record_error_at(t0 + at)),
                        }
                    }
                    verdicts
                })
            })
            .collect();
        let verdicts: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let record = m.record();
        let (successes, failures) = (m.success_count(), m.total_errors());
        let counted: Vec<_> = serials
            .iter()
            .filter(|s| s.record.successes() == successes && s.record.failures() == failures)
            .collect();
        assert!(
            !counted.is_empty(),
            "I13 violated: counted {successes} successes and {failures} failures of {threads:?}"
        );
        // The serial orders whose replay gives exactly this record: the order the lock took.
        let taken: Vec<_> = counted.iter().filter(|s| s.record == record).collect();
        if taken.is_empty() {
            let run = record.consecutive_failures();
            assert!(
                counted
                    .iter()
                    .any(|s| s.record.consecutive_failures() == run),
                "I10 violated: the record's failure run is {run}, the trailing run of no serial order of {threads:?}"
            );
            panic!(
                "I9 violated: the record {record:?} is the replay of no serial order of {threads:?}"
            );
        }
        let run = m.consecutive_errors();
        let runs_of = |serials: &[&&Serial]| {
            serials
                .iter()
                .map(|s| (s.order.clone(), s.record.consecutive_failures()))
                .collect::<Vec<_>>()
        };
        assert!(
            taken.iter().any(|s| s.record.consecutive_failures() == run),
            "I10 violated: consecutive_errors = {run}, but the serial orders of {threads:?} that give the record end with runs {:?} (all orders: {:?})",
            runs_of(&taken),
            runs_of(&counted.iter().collect::<Vec<_>>())
        );
        let reason = m.unusable_reason();
        assert_eq!(
            m.is_healthy(),
            reason.is_none(),
            "I9 violated: is_healthy = {} with unusable_reason = {reason:?}",
            m.is_healthy()
        );
        assert!(
            taken
                .iter()
                .any(|s| s.verdicts == verdicts && s.record.unhealthy() == reason),
            "I9 violated: record {record:?}, verdicts {verdicts:?}, reason {reason:?} match no serial order of {threads:?}: {:?}",
            counted
                .iter()
                .map(|s| (&s.order, s.record.unhealthy(), &s.verdicts))
                .collect::<Vec<_>>()
        );
    });
}

/// I9, I10, I13: two failures on one thread, a success on another, threshold 2: the latch closes
/// only in the orders where the failures are adjacent (F F S and S F F), not in F S F.
#[test]
fn loom_record_vs_record_consecutive() {
    record_vs_record(
        "record_vs_record_consecutive",
        vec![vec![Op::Failure, Op::Failure], vec![Op::Success]],
        HealthPolicy {
            consecutive_failures: 2,
            ..HealthPolicy::default()
        },
    );
}

/// I9, I10, I13: three threads (failure, success, failure) under the ratio detector only (2 calls
/// at least, ratio 0.5): the reason the latch stores depends on the order (`2 of 2`, `1 of 2` or
/// `2 of 3`), and must be the one of the order the record took.
#[test]
fn loom_record_vs_record_ratio_three_threads() {
    record_vs_record(
        "record_vs_record_ratio_three_threads",
        vec![vec![Op::Failure], vec![Op::Success], vec![Op::Failure]],
        HealthPolicy {
            consecutive_failures: 0,
            failure_ratio: 0.5,
            min_requests: 2,
            ..HealthPolicy::default()
        },
    );
}

/// I9: a reader racing the failure that trips the latch (threshold 2; the first failure is
/// recorded before the threads start) and a success recorded at once on a third thread (which,
/// landing first, keeps the latch open). The reader sees healthy, or the stored reason; never
/// "unhealthy with no reason", never a reason that is not the one stored, and never the latch
/// opening again.
#[test]
fn loom_record_vs_verdict() {
    let t0 = Instant::now();
    let policy = HealthPolicy {
        consecutive_failures: 2,
        ..HealthPolicy::default()
    };
    model("record_vs_verdict", move || {
        let m = Arc::new(ConnectionMetrics::new(t0, policy));
        assert_eq!(m.record_error_at(t0 + MS), Verdict::Healthy);
        let failer = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.record_error_at(t0 + 2 * MS))
        };
        let succeeder = {
            let m = Arc::clone(&m);
            thread::spawn(move || m.record_success_at(t0 + 2 * MS, MS))
        };
        let reader = {
            let m = Arc::clone(&m);
            thread::spawn(move || {
                let healthy = m.is_healthy();
                let reason = m.unusable_reason();
                let healthy_after = m.is_healthy();
                assert!(
                    healthy || reason.is_some(),
                    "I9 violated: unhealthy with no reason"
                );
                assert!(
                    reason.is_none() || !healthy_after,
                    "I9 violated: the latch opened again after {reason:?}"
                );
                reason
            })
        };
        let verdict = failer.join().unwrap();
        succeeder.join().unwrap();
        let seen = reader.join().unwrap();
        let stored = m.unusable_reason();
        assert_eq!(
            m.is_healthy(),
            stored.is_none(),
            "I9 violated: is_healthy disagrees with the stored reason {stored:?}"
        );
        assert_eq!(
            verdict,
            stored.map_or(Verdict::Healthy, Verdict::Unhealthy),
            "I9 violated: the failure's verdict is not the latch's"
        );
        assert!(
            seen.is_none() || seen == stored,
            "I9 violated: the reader saw {seen:?}, the latch stored {stored:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// record vs snapshot: `LatencyHistogram` (issue 14)
// ---------------------------------------------------------------------------------------------

/// Two threads record a latency each while a third takes a snapshot: whatever the interleaving
/// (relaxed adds), the snapshot never counts more than was recorded, the final one never counts
/// less in any bucket, and once the recorders are joined the counts and the sum are exact.
#[test]
fn loom_latency_record_vs_snapshot() {
    use crate::core::LatencyHistogram;
    model("latency_record_vs_snapshot", || {
        let h = Arc::new(LatencyHistogram::default());
        let recorders: Vec<_> = [Duration::from_micros(3), Duration::from_millis(40)]
            .into_iter()
            .map(|latency| {
                let h = Arc::clone(&h);
                thread::spawn(move || h.record(latency))
            })
            .collect();
        let seen = h.snapshot();
        assert!(seen.count() <= 2, "counted more than was recorded");
        for r in recorders {
            r.join().unwrap();
        }
        let done = h.snapshot();
        for ((_, a), (_, b)) in seen.buckets().zip(done.buckets()) {
            assert!(a <= b, "a bucket went back between two snapshots");
        }
        assert_eq!(done.count(), 2);
        assert_eq!(done.sum(), Duration::from_micros(40_003));
    });
}
