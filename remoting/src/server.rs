//! [`MiniServer`]: a tiny remoting server for tests, simulations and the demo. It speaks the frame
//! format of [`codec`](crate::codec), answers a handful of name-server codes, and can be made slow,
//! failing, silent or connection-dropping at run time. It also counts the connections it has
//! seen, so a test can check the pool's behaviour from the server's side.
//!
//! It is not a name server: it keeps KV configs in memory and knows no topics.
//!
//! | code | answer |
//! |---|---|
//! | 319 `GET_NAMESRV_CONFIG` | success, a small properties body |
//! | 100 `PUT_KV_CONFIG` | stores `extFields.value` under (`namespace`, `key`); success |
//! | 101 `GET_KV_CONFIG` | success with `extFields.value`, or 22 `QUERY_NOT_FOUND` |
//! | 206 `GET_ALL_TOPIC_LIST_FROM_NAMESERVER` | success, body `{"topicList":[]}` |
//! | anything else | 3 `REQUEST_CODE_NOT_SUPPORTED` |

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::codec::{DEFAULT_MAX_FRAME, FrameDecoder, RemotingCommand, code, encode};

/// How a [`MiniServer`] treats requests; switchable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerBehaviour {
    /// Answers as described in the module docs.
    #[default]
    Normal,
    /// Answers every request with 1 `SYSTEM_ERROR`.
    SystemError,
    /// Closes a connection as soon as a request arrives on it.
    DropConnections,
    /// Reads requests and never answers (the client's requests time out).
    Silent,
}

impl ServerBehaviour {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SystemError,
            2 => Self::DropConnections,
            3 => Self::Silent,
            _ => Self::Normal,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Normal => 0,
            Self::SystemError => 1,
            Self::DropConnections => 2,
            Self::Silent => 3,
        }
    }
}

/// Counters of a [`MiniServer`], across its restarts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Requests received (one-way included).
    pub requests: u64,
    /// Responses sent.
    pub responses: u64,
}

#[derive(Default)]
struct State {
    delay_us: AtomicU64,
    behaviour: AtomicU8,
    accepted: AtomicU64,
    open: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    kv: Mutex<BTreeMap<(String, String), String>>,
}

/// A tiny remoting server on a local address. Dropping it stops it (listener and connections).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use keyed_pool_remoting::{ClientConfig, MiniServer, RemotingClient, RemotingCommand};
/// let server = MiniServer::start("127.0.0.1:0").await.unwrap();
/// let client = RemotingClient::connect(&server.addr().to_string(), ClientConfig::default())
///     .await
///     .unwrap();
/// let response = client.request(RemotingCommand::request(319)).await.unwrap();
/// assert!(response.is_success());
/// assert_eq!(server.stats().accepted, 1);
/// # }
/// ```
pub struct MiniServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<watch::Sender<bool>>,
    accept_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MiniServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniServer")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MiniServer {
    /// Binds `addr` (e.g. `"127.0.0.1:0"` for a free port) and starts serving.
    ///
    /// # Errors
    /// The bind error.
    pub async fn start(addr: &str) -> io::Result<Self> {
        let mut server = Self {
            addr: addr
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            state: Arc::new(State::default()),
            stop: None,
            accept_task: None,
        };
        server.listen(addr).await?;
        Ok(server)
    }

    async fn listen(&mut self, addr: &str) -> io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        self.addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        self.stop = Some(stop);
        self.accept_task = Some(tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.state),
            stop_rx,
        )));
        Ok(())
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `true` between `start`/`restart` and `stop`.
    pub fn is_running(&self) -> bool {
        self.stop.is_some()
    }

    /// Stops listening and closes every connection, like a killed process: once this returns,
    /// new connects are refused and every client of it reads EOF.
    pub async fn stop(&mut self) {
        self.signal_stop();
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send_replace(true);
        }
    }

    /// Listens again on the same address, with the same state (KV, counters, behaviour).
    ///
    /// # Errors
    /// The bind error (the port may have been taken meanwhile).
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await;
        let addr = self.addr.to_string();
        self.listen(&addr).await
    }

    /// Delays every answer by `delay` (answers stay concurrent: a slow request does not hold up
    /// the others on its connection).
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.state.delay_us.store(us, Ordering::Relaxed);
    }

    /// Switches how requests are treated from now on.
    pub fn set_behaviour(&self, behaviour: ServerBehaviour) {
        self.state
            .behaviour
            .store(behaviour.as_u8(), Ordering::Relaxed);
    }

    /// The current behaviour.
    pub fn behaviour(&self) -> ServerBehaviour {
        ServerBehaviour::from_u8(self.state.behaviour.load(Ordering::Relaxed))
    }

    /// The server's counters.
    pub fn stats(&self) -> ServerStats {
        let s = &self.state;
        ServerStats {
            accepted: s.accepted.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            responses: s.responses.load(Ordering::Relaxed),
        }
    }
}

impl Drop for MiniServer {
    fn drop(&mut self) {
        // Cannot wait here: the tasks finish on their own shortly.
        self.signal_stop();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                state.accepted.fetch_add(1, Ordering::Relaxed);
                state.open.fetch_add(1, Ordering::Relaxed);
                connections.retain(|c| !c.is_finished());
                connections.push(tokio::spawn(serve(
                    stream,
                    Arc::clone(&state),
                    stop.clone(),
                )));
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                // Transient (e.g. too many open files): try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // Stopped: like a killed process, drop the listener and every connection now.
    drop(listener);
    for connection in &connections {
        connection.abort();
    }
    for connection in connections {
        let _ = connection.await;
    }
}

/// Decrements the open-connection count however the connection ends.
struct OpenGuard(Arc<State>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves one connection. One task owns the stream, so aborting it closes the socket at once.
async fn serve(mut stream: TcpStream, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let _open = OpenGuard(Arc::clone(&state));
    let _ = stream.set_nodelay(true);
    // Delayed answers come back through this channel, so they stay concurrent.
    let (tx, mut rx) = mpsc::unbounded_channel::<RemotingCommand>();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    'conn: loop {
        let mut answered = 0u64;
        tokio::select! {
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => break 'conn,
                Ok(n) => decoder.extend(&chunk[..n]),
            },
            Some(response) = rx.recv() => {
                if encode(&response, DEFAULT_MAX_FRAME, &mut out).is_ok() {
                    answered += 1;
                }
            }
            _ = stop.wait_for(|s| *s) => break 'conn,
        }
        loop {
            let request = match decoder.next_command() {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad frame; closing the connection");
                    break 'conn;
                }
            };
            if request.is_response() {
                continue;
            }
            state.requests.fetch_add(1, Ordering::Relaxed);
            let behaviour = ServerBehaviour::from_u8(state.behaviour.load(Ordering::Relaxed));
            match behaviour {
                ServerBehaviour::DropConnections => break 'conn,
                ServerBehaviour::Silent => continue,
                _ => {}
            }
            let response = answer(&state, &request, behaviour);
            if request.is_oneway() {
                continue;
            }
            let delay = Duration::from_micros(state.delay_us.load(Ordering::Relaxed));
            if delay.is_zero() {
                if encode(&response, DEFAULT_MAX_FRAME, &mut out).is_ok() {
                    answered += 1;
                }
            } else {
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(response);
                });
            }
        }
        if !out.is_empty() {
            // madsim's TCP sends nothing until flush.
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                break;
            }
            out.clear();
            state.responses.fetch_add(answered, Ordering::Relaxed);
        }
    }
}

fn answer(state: &State, request: &RemotingCommand, behaviour: ServerBehaviour) -> RemotingCommand {
    if behaviour == ServerBehaviour::SystemError {
        return RemotingCommand::response_to(request, code::SYSTEM_ERROR)
            .with_remark("MiniServer is set to fail");
    }
    let field = |k: &str| request.field(k).unwrap_or_default().to_string();
    match request.code {
        code::GET_NAMESRV_CONFIG => RemotingCommand::response_to(request, code::SUCCESS)
            .with_body(&b"server=keyed-pool MiniServer\n"[..]),
        code::PUT_KV_CONFIG => {
            let mut kv = state.kv.lock().unwrap_or_else(|e| e.into_inner());
            kv.insert((field("namespace"), field("key")), field("value"));
            RemotingCommand::response_to(request, code::SUCCESS)
        }
        code::GET_KV_CONFIG => {
            let kv = state.kv.lock().unwrap_or_else(|e| e.into_inner());
            match kv.get(&(field("namespace"), field("key"))) {
                Some(value) => RemotingCommand::response_to(request, code::SUCCESS)
                    .with_field("value", value.clone()),
                None => RemotingCommand::response_to(request, code::QUERY_NOT_FOUND)
                    .with_remark("no such KV config"),
            }
        }
        code::GET_ALL_TOPIC_LIST_FROM_NAMESERVER => {
            RemotingCommand::response_to(request, code::SUCCESS)
                .with_body(&br#"{"topicList":[]}"#[..])
        }
        _ => RemotingCommand::response_to(request, code::REQUEST_CODE_NOT_SUPPORTED)
            .with_remark(format!("request code {} not supported", request.code)),
    }
}
