//! Brokers: tiny request/response servers on simulated TCP that keep their own books: connections
//! accepted and open, and when each was accepted and from which client socket (the broker-side I12
//! check measures backoff gaps between accepts; connector count = broker count at quiescence).
//! A broker can also be made to fail the ways real servers do: slow, answering errors, or closing
//! every connection at once ([`CloseMode`]).
//!
//! Wire format (fixed size, no length prefix): a request is `id: u64, op: u8, arg: u32` (13 bytes),
//! a response is `id: u64, status: u8` (9 bytes). `op` 0 is a ping; `op` 1 asks the broker to work
//! `arg` milliseconds first. Status 0 is success, 1 an application error (the transport stays fine).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::madsim::rand::{Rng, thread_rng};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

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
    /// How the broker treats a new connection: [`CloseMode`] as a number.
    pub close_mode: AtomicU32,
    /// Every accept: the peer (the client's local socket) and when.
    accepts: StdMutex<Vec<(SocketAddr, Instant)>>,
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
            close_mode: AtomicU32::new(CloseMode::Serve as u32),
            accepts: StdMutex::new(Vec::new()),
            listening: AtomicBool::new(false),
            incarnations: AtomicU64::new(0),
        }
    }

    /// Connections open at the broker now.
    pub fn open(&self) -> i64 {
        self.open.load(Ordering::SeqCst)
    }

    /// How new connections are treated from now on.
    pub fn set_close_mode(&self, mode: CloseMode) {
        self.close_mode.store(mode as u32, Ordering::SeqCst);
    }

    /// The last accept no later than `t`.
    pub fn last_accept_by(&self, t: Instant) -> Option<Instant> {
        let accepts = self.accepts.lock().expect("accepts lock");
        accepts.iter().rev().map(|&(_, at)| at).find(|&at| at <= t)
    }

    /// When the connection from `peer` begun at `started` or later was accepted, if it was.
    pub fn accepted_from(&self, peer: SocketAddr, started: Instant) -> Option<Instant> {
        let accepts = self.accepts.lock().expect("accepts lock");
        accepts
            .iter()
            .rev()
            .take_while(|&&(_, at)| at >= started)
            .find(|&&(p, _)| p == peer)
            .map(|&(_, at)| at)
    }
}

/// How a broker treats the connections it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseMode {
    /// Serves requests until the client closes.
    Serve = 0,
    /// Closes every connection as soon as it is accepted (a load balancer in front of a dead
    /// broker).
    AtAccept = 1,
    /// Answers the first request (the client's handshake), then closes.
    AfterHandshake = 2,
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
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        state
            .accepts
            .lock()
            .expect("accepts lock")
            .push((peer, Instant::now()));
        state.accepted.fetch_add(1, Ordering::SeqCst);
        state.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(Arc::clone(&state));
        tokio::spawn(handle(stream, guard));
    }
}

async fn handle(mut stream: TcpStream, guard: OpenGuard) {
    let state = &guard.0;
    let mode = state.close_mode.load(Ordering::SeqCst);
    if mode == CloseMode::AtAccept as u32 {
        return; // dropping the stream closes it
    }
    let mut served = 0u32;
    let mut req = [0u8; REQ_LEN];
    loop {
        if mode == CloseMode::AfterHandshake as u32 && served == 1 {
            break;
        }
        served += 1;
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
