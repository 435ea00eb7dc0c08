//! Brokers: tiny request/response servers on simulated TCP that count the connections they see, so
//! "pool count = broker count at quiescence" is checked from outside the pool.
//!
//! Wire format (fixed size, no length prefix): a request is `id: u64, op: u8, arg: u32` (13 bytes),
//! a response is `id: u64, status: u8` (9 bytes). `op` 0 is a ping; `op` 1 asks the broker to work
//! `arg` milliseconds first. Status 0 is success, 1 an application error (the transport stays fine).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::madsim::rand::{Rng, thread_rng};
use tokio::net::{TcpListener, TcpStream};

/// The port every broker listens on.
pub const PORT: u16 = 9000;
/// Size of a request frame.
pub const REQ_LEN: usize = 13;
/// Size of a response frame.
pub const RESP_LEN: usize = 9;

/// What a broker has seen, shared with the supervisor. Survives kill and restart of the node.
#[derive(Debug)]
pub struct BrokerState {
    /// `ip:port` as the pool knows it.
    pub addr: SocketAddr,
    /// Connections accepted over the broker's whole life (all incarnations).
    pub accepted: AtomicU64,
    /// Connections open now: accepted and not yet closed by either side (a kill closes them all).
    pub open: AtomicI64,
    /// Requests answered.
    pub answered: AtomicU64,
    /// Extra latency added to every request, in milliseconds ("slow broker").
    pub delay_ms: AtomicU64,
    /// Per mille of requests answered with an application error.
    pub error_permille: AtomicU32,
    /// `true` while the current incarnation has its listener bound.
    pub listening: AtomicBool,
    /// Incarnations started (first start and every restart).
    pub incarnations: AtomicU64,
}

impl BrokerState {
    /// A broker that will listen on `ip:PORT`.
    pub fn new(ip: IpAddr) -> Self {
        Self {
            addr: SocketAddr::new(ip, PORT),
            accepted: AtomicU64::new(0),
            open: AtomicI64::new(0),
            answered: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            error_permille: AtomicU32::new(0),
            listening: AtomicBool::new(false),
            incarnations: AtomicU64::new(0),
        }
    }

    /// Connections open at the broker now.
    pub fn open(&self) -> i64 {
        self.open.load(Ordering::SeqCst)
    }
}

/// Counts one open connection for as long as its handler task lives (dropped on EOF, error or kill).
struct OpenGuard(Arc<BrokerState>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Clears `listening` when the incarnation's accept loop goes (kill or restart).
struct ListenGuard(Arc<BrokerState>);

impl Drop for ListenGuard {
    fn drop(&mut self) {
        self.0.listening.store(false, Ordering::SeqCst);
    }
}

/// The broker's main task (the node's init task; it re-runs on restart).
pub async fn serve(state: Arc<BrokerState>) {
    state.incarnations.fetch_add(1, Ordering::SeqCst);
    // After a restart the previous incarnation's listener is released only once madsim has dropped
    // its task: retry for a while.
    let mut tries = 0;
    let listener = loop {
        match TcpListener::bind(SocketAddr::new([0, 0, 0, 0].into(), PORT)).await {
            Ok(listener) => break listener,
            Err(err) if tries < 1000 => {
                tries += 1;
                let _ = err;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(err) => panic!("broker bind: {err}"),
        }
    };
    state.listening.store(true, Ordering::SeqCst);
    let _listening = ListenGuard(Arc::clone(&state));
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        state.accepted.fetch_add(1, Ordering::SeqCst);
        state.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(Arc::clone(&state));
        tokio::spawn(handle(stream, guard));
    }
}

async fn handle(mut stream: TcpStream, guard: OpenGuard) {
    let state = &guard.0;
    let mut req = [0u8; REQ_LEN];
    loop {
        if stream.read_exact(&mut req).await.is_err() {
            break; // EOF or reset: the client closed it
        }
        let id = u64::from_be_bytes(req[0..8].try_into().expect("8 bytes"));
        let op = req[8];
        let arg = u32::from_be_bytes(req[9..13].try_into().expect("4 bytes"));
        let mut work = state.delay_ms.load(Ordering::SeqCst);
        if op == 1 {
            work += u64::from(arg);
        }
        if work > 0 {
            tokio::time::sleep(Duration::from_millis(work)).await;
        }
        let permille = state.error_permille.load(Ordering::SeqCst);
        let failed = permille > 0 && thread_rng().gen_range(0..1000) < permille;
        let mut resp = [0u8; RESP_LEN];
        resp[0..8].copy_from_slice(&id.to_be_bytes());
        resp[8] = u8::from(failed);
        if stream.write_all(&resp).await.is_err() || stream.flush().await.is_err() {
            break;
        }
        state.answered.fetch_add(1, Ordering::SeqCst);
    }
}
