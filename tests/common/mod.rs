//! A scripted connector for the core's tests: it counts connects and closes, and each connect
//! succeeds, fails or hangs as the test says.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyed_pool::{CheetahString, ConnectionPool, Connector, PoolBuilder};
use tokio::time::Instant;

/// A connection made by [`Script`]: its serial number and an open flag the test can clear.
#[derive(Debug)]
pub struct Conn {
    pub serial: u64,
    pub open: Arc<AtomicBool>,
    pub closed_by_pool: Arc<AtomicBool>,
}

impl Conn {
    pub fn new(serial: u64) -> Self {
        Self {
            serial,
            open: Arc::new(AtomicBool::new(true)),
            closed_by_pool: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What the next connect does.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// Succeeds after this delay.
    Ok(Duration),
    /// Fails after this delay.
    Fail(Duration),
    /// Succeeds after this delay with a connection whose transport is already closed (it died
    /// between the connect and its first use).
    OkButClosed(Duration),
    /// Never finishes (the pool's timeout must cut it).
    Hang,
}

#[derive(Debug, thiserror::Error)]
#[error("scripted connect failure #{0}")]
pub struct ScriptError(pub u64);

#[derive(Default)]
pub struct ScriptState {
    pub outcomes: Mutex<VecDeque<Outcome>>,
    /// Used when `outcomes` is empty.
    pub default: Mutex<Option<Outcome>>,
    pub connects: AtomicU64,
    pub closes: AtomicU64,
    /// Connects that made a connection.
    pub made: AtomicU64,
    pub connect_times: Mutex<Vec<Instant>>,
}

/// The scripted connector; clones share their state.
#[derive(Clone, Default)]
pub struct Script(pub Arc<ScriptState>);

impl Script {
    pub fn always(outcome: Outcome) -> Self {
        let s = Self::default();
        *s.0.default.lock().unwrap() = Some(outcome);
        s
    }
    pub fn then(&self, outcome: Outcome) -> &Self {
        self.0.outcomes.lock().unwrap().push_back(outcome);
        self
    }
    pub fn set_default(&self, outcome: Outcome) {
        *self.0.default.lock().unwrap() = Some(outcome);
    }
    pub fn connects(&self) -> u64 {
        self.0.connects.load(Ordering::SeqCst)
    }
    pub fn closes(&self) -> u64 {
        self.0.closes.load(Ordering::SeqCst)
    }
    /// Connections made and not yet closed by the pool: what is open at the connector (I1).
    pub fn open_now(&self) -> u64 {
        self.0.made.load(Ordering::SeqCst) - self.closes()
    }
    pub fn connect_times(&self) -> Vec<Instant> {
        self.0.connect_times.lock().unwrap().clone()
    }
    /// A pool builder on this connector with a global cap (`0` = none) and a per-address one.
    pub fn builder(&self, max: usize, per_address: usize) -> PoolBuilder<Script> {
        ConnectionPool::builder()
            .connector(self.clone())
            .max_connections(max)
            .max_per_address(per_address)
    }
}

impl Connector for Script {
    type Conn = Conn;
    type Error = ScriptError;

    async fn connect(&self, _addr: &str) -> Result<Conn, ScriptError> {
        let serial = self.0.connects.fetch_add(1, Ordering::SeqCst) + 1;
        self.0.connect_times.lock().unwrap().push(Instant::now());
        let outcome = self
            .0
            .outcomes
            .lock()
            .unwrap()
            .pop_front()
            .or(*self.0.default.lock().unwrap())
            .unwrap_or(Outcome::Ok(Duration::ZERO));
        match outcome {
            Outcome::Ok(d) => {
                tokio::time::sleep(d).await;
                self.0.made.fetch_add(1, Ordering::SeqCst);
                Ok(Conn::new(serial))
            }
            Outcome::OkButClosed(d) => {
                tokio::time::sleep(d).await;
                self.0.made.fetch_add(1, Ordering::SeqCst);
                let conn = Conn::new(serial);
                conn.open.store(false, Ordering::SeqCst);
                Ok(conn)
            }
            Outcome::Fail(d) => {
                tokio::time::sleep(d).await;
                Err(ScriptError(serial))
            }
            Outcome::Hang => {
                std::future::pending::<()>().await;
                unreachable!()
            }
        }
    }

    fn validate(&self, addr: &str) -> Result<(), String> {
        keyed_pool::tcp::validate_addr(addr)
    }

    fn is_open(&self, conn: &Conn) -> bool {
        // A connection the pool closed is closed, as a real transport would be.
        conn.open.load(Ordering::SeqCst) && !conn.closed_by_pool.load(Ordering::SeqCst)
    }

    fn close(&self, conn: &Conn) {
        conn.closed_by_pool.store(true, Ordering::SeqCst);
        self.0.closes.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn addr(i: usize) -> CheetahString {
    CheetahString::from(format!("10.0.0.{}:10911", i + 1))
}

pub const MS: Duration = Duration::from_millis(1);
pub const SEC: Duration = Duration::from_secs(1);

/// Sleeps on the runtime's clock (virtual under paused time and madsim).
pub async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}
