//! The per-seed record: the first invariant violation (by number) and a trace hash of everything
//! that happened, used by the determinism check.

use std::fmt;
use std::sync::Mutex;

use tokio::time::Instant;

/// One invariant violation, by its number in docs/DESIGN.md (or `ACC` for the pool/connector/broker
/// accounting, `SIM` for a broken simulation harness).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// `"I1"` … `"I18"`, `"ACC"` or `"SIM"`.
    pub inv: &'static str,
    /// What was seen, with the virtual time.
    pub msg: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violated: {}", self.inv, self.msg)
    }
}

struct State {
    violations: Vec<Violation>,
    hash: u64,
    events: u64,
}

/// Collects violations found anywhere in the simulation (connector callbacks, tasks, checks) and
/// hashes the event trace.
pub struct Recorder {
    epoch: Instant,
    state: Mutex<State>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            state: Mutex::new(State {
                violations: Vec::new(),
                hash: 0xcbf2_9ce4_8422_2325,
                events: 0,
            }),
        }
    }

    /// Virtual milliseconds since the simulation started (for messages).
    pub fn now_ms(&self) -> f64 {
        Instant::now().duration_since(self.epoch).as_secs_f64() * 1000.0
    }

    /// Virtual milliseconds from the start to `at` (for messages).
    pub fn ms_of(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64() * 1000.0
    }

    /// Virtual nanoseconds since the simulation started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(Instant::now().duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Virtual microseconds since the simulation started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(Instant::now().duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Records a violation of `inv` (kept: the first few).
    pub fn fail(&self, inv: &'static str, msg: impl Into<String>) {
        let msg = format!("at t={:.3}ms: {}", self.now_ms(), msg.into());
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("violation {inv}: {msg}");
        }
        let mut state = self.state.lock().expect("recorder lock");
        // The first few, and the first of every other invariant (for the "also" list).
        if state.violations.len() < 8
            || (state.violations.len() < 32 && state.violations.iter().all(|v| v.inv != inv))
        {
            state.violations.push(Violation { inv, msg });
        }
    }

    /// `true` once any violation was recorded.
    pub fn failed(&self) -> bool {
        !self
            .state
            .lock()
            .expect("recorder lock")
            .violations
            .is_empty()
    }

    /// The first violation, if any.
    pub fn first(&self) -> Option<Violation> {
        self.state
            .lock()
            .expect("recorder lock")
            .violations
            .first()
            .cloned()
    }

    /// Every other invariant violated after the first one, in order: `"I18 I12"`.
    pub fn also(&self) -> String {
        let state = self.state.lock().expect("recorder lock");
        let mut seen: Vec<&str> = Vec::new();
        for v in &state.violations {
            if !seen.contains(&v.inv) {
                seen.push(v.inv);
            }
        }
        seen.iter().skip(1).copied().collect::<Vec<_>>().join(" ")
    }

    /// Adds an event (with the virtual time) to the trace hash.
    pub fn event(&self, event: fmt::Arguments<'_>) {
        let line = format!("{} {}", self.now_us(), event);
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("trace {line}");
        }
        let mut state = self.state.lock().expect("recorder lock");
        for b in line.as_bytes() {
            state.hash ^= u64::from(*b);
            state.hash = state.hash.wrapping_mul(0x0100_0000_01b3);
        }
        state.events += 1;
    }

    /// `(hash, events)` of the trace so far.
    pub fn trace(&self) -> (u64, u64) {
        let state = self.state.lock().expect("recorder lock");
        (state.hash, state.events)
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Records an event in the trace: `trace!(rec, "kill b{}", i)`.
#[macro_export]
macro_rules! trace {
    ($rec:expr, $($arg:tt)*) => {
        $rec.event(format_args!($($arg)*))
    };
}
