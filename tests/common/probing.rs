//! A connector for the liveness and warm-up tests: the scripted connector of `common`, plus a
//! scripted `probe`, addresses that refuse, and books of how many probes and connects ran at once.
//! Used by `tests/liveness.rs` and `tests/warmup.rs` (`#[path]`), beside `mod common`.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyed_pool::Connector;
use tokio::time::Instant;

use crate::common::{Conn, Script, ScriptError};

/// What a probe of one connection (by serial) does, beyond the common delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Answers after the delay (if its transport is open).
    Answers,
    /// Never answers: the server hung or the host vanished (the pool's timeout must cut it).
    Silent,
    /// Finds the peer gone: the transport turns closed and the probe fails.
    Reset,
}

#[derive(Default)]
pub struct Books {
    /// Every connect attempt, refused ones included.
    pub connects: AtomicU64,
    pub probes: AtomicU64,
    pub probes_now: AtomicU64,
    pub probes_most: AtomicU64,
    pub connects_now: AtomicU64,
    pub connects_most: AtomicU64,
    pub probe_delay: Mutex<Duration>,
    pub by_serial: Mutex<Vec<(u64, Probe)>>,
    pub refused: Mutex<HashSet<String>>,
}

/// Counts one operation in flight; given back however the operation ends (finished or dropped).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(now: &'a AtomicU64, most: &AtomicU64) -> Self {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        most.fetch_max(n, Ordering::SeqCst);
        Self(now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
pub struct Probing {
    pub script: Script,
    pub books: Arc<Books>,
}

impl Probing {
    pub fn new(script: Script) -> Self {
        Self {
            script,
            books: Arc::default(),
        }
    }
    /// From now on, probes of connection `serial` behave as `probe`.
    pub fn set_probe(&self, serial: u64, probe: Probe) {
        self.books.by_serial.lock().unwrap().push((serial, probe));
    }
    pub fn set_probe_delay(&self, delay: Duration) {
        *self.books.probe_delay.lock().unwrap() = delay;
    }
    pub fn refuse(&self, addr: impl AsRef<str>) {
        self.books
            .refused
            .lock()
            .unwrap()
            .insert(addr.as_ref().to_string());
    }
    pub fn probes(&self) -> u64 {
        self.books.probes.load(Ordering::SeqCst)
    }
    pub fn most_probes_at_once(&self) -> u64 {
        self.books.probes_most.load(Ordering::SeqCst)
    }
    pub fn most_connects_at_once(&self) -> u64 {
        self.books.connects_most.load(Ordering::SeqCst)
    }
    pub fn connects(&self) -> u64 {
        self.books.connects.load(Ordering::SeqCst)
    }
    pub fn closes(&self) -> u64 {
        self.script.closes()
    }
    fn probe_of(&self, serial: u64) -> Probe {
        let by_serial = self.books.by_serial.lock().unwrap();
        by_serial
            .iter()
            .rev()
            .find(|(s, _)| *s == serial)
            .map_or(Probe::Answers, |(_, p)| *p)
    }
}

impl Connector for Probing {
    type Conn = Conn;
    type Error = ScriptError;

    async fn connect(&self, addr: &str) -> Result<Conn, ScriptError> {
        let books = &self.books;
        books.connects.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::new(&books.connects_now, &books.connects_most);
        if books.refused.lock().unwrap().contains(addr) {
            // Refused, as a closed port refuses: at once, without a connection.
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(ScriptError(0));
        }
        self.script.connect(addr).await
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        self.script.validate(addr)
    }

    fn is_open(&self, conn: &Conn) -> bool {
        self.script.is_open(conn)
    }

    async fn probe(&self, conn: &Conn) -> Result<(), ScriptError> {
        let books = &self.books;
        books.probes.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight::new(&books.probes_now, &books.probes_most);
        let delay = *books.probe_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        match self.probe_of(conn.serial) {
            Probe::Answers if self.script.is_open(conn) => Ok(()),
            Probe::Answers => Err(ScriptError(conn.serial)),
            Probe::Silent => std::future::pending().await,
            Probe::Reset => {
                conn.open.store(false, Ordering::SeqCst);
                Err(ScriptError(conn.serial))
            }
        }
    }

    fn close(&self, conn: &Conn) {
        self.script.close(conn);
    }
}

/// `started.elapsed()` is `expected`, give or take the 1 ms the runtime may add (madsim's clock
/// moves a little on every poll; tokio's paused clock does not).
#[track_caller]
pub fn assert_took(started: Instant, expected: Duration, what: &str) {
    let took = started.elapsed();
    assert!(
        took >= expected && took <= expected + Duration::from_millis(1),
        "{what}: took {took:?}, expected {expected:?}"
    );
}
