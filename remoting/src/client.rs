//! [`RemotingClient`]: one multiplexed remoting connection, shared by cheap clones.
//!
//! Each connection runs a writer task (frames from every handle, flushed after each batch: madsim's
//! simulated TCP sends nothing until `flush`) and a reader task (frames matched to their requests by
//! `opaque`; responses may arrive in any order). When either task sees the connection end, the
//! client turns closed and every pending request fails at once with the cause.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::codec::{
    CodecError, DEFAULT_MAX_FRAME, FLAG_ONEWAY, FrameDecoder, RemotingCommand, code, encode,
};

/// Settings of a [`RemotingClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Bound on each request made with [`RemotingClient::request`], from send to response.
    /// Default: 3 s (RocketMQ's client default).
    pub request_timeout: Duration,
    /// Largest frame accepted from the peer or sent to it. Default: [`DEFAULT_MAX_FRAME`].
    pub max_frame: usize,
    /// Frames queued for the writer before senders wait (at least 1). Default: 1024.
    pub send_queue: usize,
    /// Request code sent by [`RemotingClient::probe`]. Default:
    /// [`GET_NAMESRV_CONFIG`](code::GET_NAMESRV_CONFIG), which a name server answers cheaply.
    pub probe_code: i32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(3),
            max_frame: DEFAULT_MAX_FRAME,
            send_queue: 1024,
            probe_code: code::GET_NAMESRV_CONFIG,
        }
    }
}

impl ClientConfig {
    /// Sets [`request_timeout`](Self::request_timeout).
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`max_frame`](Self::max_frame).
    #[must_use]
    pub fn max_frame(mut self, max: usize) -> Self {
        self.max_frame = max;
        self
    }

    /// Sets [`send_queue`](Self::send_queue).
    #[must_use]
    pub fn send_queue(mut self, frames: usize) -> Self {
        self.send_queue = frames;
        self
    }

    /// Sets [`probe_code`](Self::probe_code).
    #[must_use]
    pub fn probe_code(mut self, code: i32) -> Self {
        self.probe_code = code;
        self
    }
}

/// Why a remoting call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RemotingError {
    /// Connecting failed.
    #[error("connect failed: {0}")]
    Connect(Arc<io::Error>),
    /// No response within the request timeout; the request is forgotten (a late response is
    /// dropped).
    #[error("no response to request {opaque} within {timeout:?}")]
    Timeout {
        /// The request's opaque.
        opaque: i32,
        /// The timeout applied.
        timeout: Duration,
    },
    /// The connection is closed (by [`RemotingClient::close`], by the peer, or after an I/O or
    /// codec error); the reason says which.
    #[error("connection closed: {0}")]
    Closed(Arc<str>),
    /// The command could not be encoded (too large).
    #[error(transparent)]
    Encode(#[from] CodecError),
}

impl RemotingError {
    /// `true` if the transport failed (closed, timed out, or could not connect): the kind of
    /// failure that counts against the connection's health.
    pub fn is_transport(&self) -> bool {
        !matches!(self, Self::Encode(_))
    }
}

type Reply = oneshot::Sender<Result<RemotingCommand, RemotingError>>;

/// State shared by the handles and the connection's two tasks.
struct Core {
    /// `None` once the connection is closed: requests registered after that fail at once.
    pending: Mutex<Option<HashMap<i32, Reply>>>,
    open: AtomicBool,
    reason: Mutex<Option<Arc<str>>>,
    stop: watch::Sender<bool>,
}

impl Core {
    /// Closes the connection once: records `reason`, fails every pending request, stops the tasks.
    fn shut(&self, reason: &str) {
        let drained = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.open.store(false, Ordering::Release);
            pending.take()
        };
        let Some(drained) = drained else { return };
        let reason: Arc<str> = Arc::from(reason);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&reason));
        tracing::debug!(%reason, pending = drained.len(), "remoting connection closed");
        for (_, reply) in drained {
            let _ = reply.send(Err(RemotingError::Closed(Arc::clone(&reason))));
        }
        self.stop.send_replace(true);
    }

    fn closed_error(&self) -> RemotingError {
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        RemotingError::Closed(reason.unwrap_or_else(|| Arc::from("closed")))
    }

    /// Registers a request; `Err` if the connection is already closed. Registration and closing
    /// take the same lock, so a request is either failed by `shut` or registered before it.
    fn register(&self, opaque: i32, reply: Reply) -> Result<(), RemotingError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.as_mut() {
            Some(map) => {
                map.insert(opaque, reply);
                Ok(())
            }
            None => {
                drop(pending);
                Err(self.closed_error())
            }
        }
    }

    fn forget(&self, opaque: i32) {
        if let Some(map) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            map.remove(&opaque);
        }
    }

    fn complete(&self, response: RemotingCommand) {
        let reply = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|map| map.remove(&response.opaque));
        match reply {
            Some(reply) => {
                let _ = reply.send(Ok(response));
            }
            None => tracing::debug!(opaque = response.opaque, "response to no pending request"),
        }
    }
}

/// What the handles share; dropping the last handle closes the connection.
struct Handle {
    core: Arc<Core>,
    tx: mpsc::Sender<Vec<u8>>,
    next_opaque: AtomicI32,
    config: ClientConfig,
    peer: String,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.shut("every handle was dropped");
    }
}

/// A multiplexed RocketMQ remoting connection. Clones share it; any number of requests may be in
/// flight at once, matched to their responses by `opaque`.
///
/// ```no_run
/// # async fn demo() -> Result<(), keyed_pool_remoting::RemotingError> {
/// use keyed_pool_remoting::{ClientConfig, RemotingClient, RemotingCommand, codec::code};
/// let client = RemotingClient::connect("127.0.0.1:9876", ClientConfig::default()).await?;
/// let put = RemotingCommand::request(code::PUT_KV_CONFIG)
///     .with_field("namespace", "demo")
///     .with_field("key", "k")
///     .with_field("value", "v");
/// assert!(client.request(put).await?.is_success());
/// client.close();
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RemotingClient {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for RemotingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotingClient")
            .field("peer", &self.handle.peer)
            .field("open", &self.is_open())
            .finish_non_exhaustive()
    }
}

impl RemotingClient {
    /// Connects to `addr` and starts the connection's reader and writer tasks.
    ///
    /// # Errors
    /// [`RemotingError::Connect`] with the I/O error.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is started before the TCP connect completes.
    pub async fn connect(addr: &str, config: ClientConfig) -> Result<Self, RemotingError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| RemotingError::Connect(Arc::new(e)))?;
        // Best effort: small request frames should leave at once.
        let _ = stream.set_nodelay(true);
        Ok(Self::from_stream(stream, addr.to_string(), config))
    }

    /// Wraps a connected stream (for tests and custom connect logic).
    pub fn from_stream(stream: TcpStream, peer: String, config: ClientConfig) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let core = Arc::new(Core {
            pending: Mutex::new(Some(HashMap::new())),
            open: AtomicBool::new(true),
            reason: Mutex::new(None),
            stop,
        });
        let (tx, rx) = mpsc::channel(config.send_queue.max(1));
        let (reader, writer) = tokio::io::split(stream);
        tokio::spawn(write_loop(writer, rx, Arc::clone(&core), stop_rx.clone()));
        tokio::spawn(read_loop(
            reader,
            Arc::clone(&core),
            stop_rx,
            config.max_frame,
        ));
        Self {
            handle: Arc::new(Handle {
                core,
                tx,
                next_opaque: AtomicI32::new(1),
                config,
                peer,
            }),
        }
    }

    /// The address it was connected to.
    pub fn peer(&self) -> &str {
        &self.handle.peer
    }

    /// The client's settings.
    pub fn config(&self) -> &ClientConfig {
        &self.handle.config
    }

    /// `false` once the connection died or was closed. A flag read, no I/O.
    pub fn is_open(&self) -> bool {
        self.handle.core.open.load(Ordering::Acquire)
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<Arc<str>> {
        self.handle
            .core
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests in flight (sent or queued, awaiting their response).
    pub fn pending(&self) -> usize {
        self.handle
            .core
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, HashMap::len)
    }

    /// Closes the connection: pending requests fail with [`RemotingError::Closed`], the tasks stop
    /// and the socket closes. Does not wait.
    pub fn close(&self) {
        self.handle.core.shut("closed by the client");
    }

    fn next_opaque(&self) -> i32 {
        // Wraps after 2^31 requests; a collision needs a request pending for that long.
        self.handle.next_opaque.fetch_add(1, Ordering::Relaxed) & i32::MAX
    }

    /// Sends `cmd` as a request (its `opaque` and `flag` are set here) and waits for its response,
    /// within the configured request timeout.
    ///
    /// # Errors
    /// [`RemotingError::Timeout`], [`RemotingError::Closed`] (before or while waiting: a
    /// connection that dies fails its pending requests at once), [`RemotingError::Encode`].
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future forgets the request (a late response is discarded).
    pub async fn request(&self, cmd: RemotingCommand) -> Result<RemotingCommand, RemotingError> {
        self.request_timeout(cmd, self.handle.config.request_timeout)
            .await
    }

    /// [`request`](Self::request) with an explicit timeout.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn request_timeout(
        &self,
        mut cmd: RemotingCommand,
        timeout: Duration,
    ) -> Result<RemotingCommand, RemotingError> {
        let opaque = self.next_opaque();
        cmd.opaque = opaque;
        cmd.flag &= !(crate::codec::FLAG_RESPONSE | FLAG_ONEWAY);
        let mut frame = Vec::new();
        encode(&cmd, self.handle.config.max_frame, &mut frame)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        let core = &self.handle.core;
        core.register(opaque, reply_tx)?;
        // Forgets the request however this future ends (timeout, error or cancellation).
        let _forget = Forget { core, opaque };
        let exchange = async {
            self.handle
                .tx
                .send(frame)
                .await
                .map_err(|_| core.closed_error())?;
            reply_rx.await.unwrap_or_else(|_| Err(core.closed_error()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_elapsed) => Err(RemotingError::Timeout { opaque, timeout }),
        }
    }

    /// Sends `cmd` as a one-way request: no response is expected. Returns once the frame is queued
    /// for the writer.
    ///
    /// # Errors
    /// [`RemotingError::Closed`], [`RemotingError::Encode`].
    pub async fn send_oneway(&self, mut cmd: RemotingCommand) -> Result<(), RemotingError> {
        if !self.is_open() {
            return Err(self.handle.core.closed_error());
        }
        cmd.opaque = self.next_opaque();
        cmd.flag = (cmd.flag & !crate::codec::FLAG_RESPONSE) | FLAG_ONEWAY;
        let mut frame = Vec::new();
        encode(&cmd, self.handle.config.max_frame, &mut frame)?;
        self.handle
            .tx
            .send(frame)
            .await
            .map_err(|_| self.handle.core.closed_error())
    }

    /// A cheap request ([`ClientConfig::probe_code`]); any response proves the connection alive,
    /// whatever its code.
    ///
    /// # Errors
    /// As [`request`](Self::request).
    pub async fn probe(&self) -> Result<(), RemotingError> {
        self.request(RemotingCommand::request(self.handle.config.probe_code))
            .await
            .map(drop)
    }
}

struct Forget<'a> {
    core: &'a Core,
    opaque: i32,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.core.forget(self.opaque);
    }
}

async fn write_loop<W: tokio::io::AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
    core: Arc<Core>,
    mut stop: watch::Receiver<bool>,
) {
    let reason = loop {
        let frame = tokio::select! {
            frame = rx.recv() => frame,
            _ = stop.wait_for(|s| *s) => break None,
        };
        let Some(mut batch) = frame else {
            break Some("every handle was dropped".to_string());
        };
        // Coalesce what is already queued into one write and one flush.
        while batch.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let written = async {
            writer.write_all(&batch).await?;
            writer.flush().await
        };
        let result = tokio::select! {
            r = written => r,
            _ = stop.wait_for(|s| *s) => break None,
        };
        if let Err(e) = result {
            break Some(format!("write failed: {e}"));
        }
    };
    if let Some(reason) = reason {
        core.shut(&reason);
    }
    let _ = writer.shutdown().await;
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    core: Arc<Core>,
    mut stop: watch::Receiver<bool>,
    max_frame: usize,
) {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut chunk = vec![0u8; 16 * 1024];
    let reason = 'outer: loop {
        let read = tokio::select! {
            r = reader.read(&mut chunk) => r,
            _ = stop.wait_for(|s| *s) => break None,
        };
        match read {
            Ok(0) => break Some("closed by the peer".to_string()),
            Ok(n) => decoder.extend(&chunk[..n]),
            Err(e) => break Some(format!("read failed: {e}")),
        }
        loop {
            match decoder.next_command() {
                Ok(Some(cmd)) if cmd.is_response() => core.complete(cmd),
                Ok(Some(cmd)) => {
                    // Server-initiated requests (e.g. CHECK_TRANSACTION_STATE) are not served by
                    // this client.
                    tracing::debug!(code = cmd.code, "ignoring a request from the server");
                }
                Ok(None) => break,
                Err(e) => break 'outer Some(format!("bad frame from the peer: {e}")),
            }
        }
    };
    if let Some(reason) = reason {
        core.shut(&reason);
    }
}
