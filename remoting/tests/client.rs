//! The remoting transport: codec, multiplexed client, and the pool's connector. Every test runs
//! under real tokio (paused clock, real loopback TCP) and under madsim (simulated TCP):
//! `cargo test --test remoting_client --config "build.rustflags=['--cfg','madsim']" --config "build.target-dir='target/sim'"`.

use std::time::Duration;

use keyed_pool::{CheetahString, ConnectionPool, PoolError};
use keyed_pool_remoting::codec::{
    CodecError, DEFAULT_MAX_FRAME, FLAG_ONEWAY, FLAG_RESPONSE, FrameDecoder, RemotingCommand, code,
    encode,
};
use keyed_pool_remoting::{
    CallError, ClientConfig, MiniServer, RemotingClient, RemotingConnector, RemotingError,
    ServerBehaviour, pool_request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn frame(cmd: &RemotingCommand) -> Vec<u8> {
    let mut out = Vec::new();
    encode(cmd, DEFAULT_MAX_FRAME, &mut out).expect("encodable");
    out
}

fn kv_put(key: &str, value: &str) -> RemotingCommand {
    RemotingCommand::request(code::PUT_KV_CONFIG)
        .with_field("namespace", "test")
        .with_field("key", key)
        .with_field("value", value)
}

fn kv_get(key: &str) -> RemotingCommand {
    RemotingCommand::request(code::GET_KV_CONFIG)
        .with_field("namespace", "test")
        .with_field("key", key)
}

/// Where tests that stop and restart a server bind it. Under madsim a fixed high port: madsim hands
/// out ephemeral ports from 1 upwards for listeners and client sockets alike, and a connect to a
/// freed ephemeral port can reach a client socket bound to `0.0.0.0` on that port instead of being
/// refused. On real TCP, a free port.
const STOPPABLE_ADDR: &str = if cfg!(madsim) {
    "127.0.0.1:40000"
} else {
    "127.0.0.1:0"
};

fn config(timeout: Duration) -> ClientConfig {
    ClientConfig::default().request_timeout(timeout)
}

/// Reads one whole frame from a raw stream (for the hand-written servers below).
async fn read_request(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
) -> Option<RemotingCommand> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(cmd) = decoder.next_command().expect("client frames are valid") {
            return Some(cmd);
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        decoder.extend(&chunk[..n]);
    }
}

async fn write_all_flush(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("write");
    stream.flush().await.expect("flush");
}

// ---------------------------------------------------------------- codec

#[test]
fn codec_round_trips_requests_and_responses() {
    let request = RemotingCommand::request(code::PUT_KV_CONFIG)
        .with_field("namespace", "ns")
        .with_field("key", "k")
        .with_field("value", "é and \"quotes\"")
        .with_body(vec![0u8, 1, 2, 255]);
    let mut response =
        RemotingCommand::response_to(&request, code::QUERY_NOT_FOUND).with_remark("not found");
    response.opaque = 77;
    let mut wire = frame(&request);
    wire.extend(frame(&response));
    // Fed one byte at a time, the decoder yields both commands, in order, exactly once.
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    let mut out = Vec::new();
    for b in &wire {
        decoder.extend(std::slice::from_ref(b));
        while let Some(cmd) = decoder.next_command().unwrap() {
            out.push(cmd);
        }
    }
    assert_eq!(out, vec![request, response.clone()]);
    assert_eq!(decoder.buffered(), 0);
    assert!(out[1].is_response() && !out[1].is_oneway() && !out[1].is_success());
    assert_eq!(out[1].flag, FLAG_RESPONSE);
}

#[test]
fn codec_writes_the_documented_layout() {
    let wire = frame(&RemotingCommand::request(319).with_body(&b"xyz"[..]));
    let total = u32::from_be_bytes(wire[0..4].try_into().unwrap()) as usize;
    assert_eq!(total, wire.len() - 4);
    assert_eq!(wire[4], 0, "serialisation type byte: JSON");
    let header_len = u32::from_be_bytes([0, wire[5], wire[6], wire[7]]) as usize;
    let header: &str = std::str::from_utf8(&wire[8..8 + header_len]).unwrap();
    assert!(header.contains("\"code\":319"), "{header}");
    assert!(header.contains("\"extFields\""), "{header}");
    assert!(
        header.contains("\"serializeTypeCurrentRPC\":\"JSON\""),
        "{header}"
    );
    assert_eq!(&wire[8 + header_len..], b"xyz");
}

#[test]
fn codec_accepts_null_remark_and_ext_fields() {
    // What the RocketMQ name server sends: nulls, and fields this codec does not know.
    let header = br#"{"code":0,"language":"RUST","version":474,"opaque":9,"flag":1,"remark":null,"extFields":null,"serializeTypeCurrentRPC":"JSON"}"#;
    let mut wire = ((4 + header.len()) as u32).to_be_bytes().to_vec();
    wire.extend((header.len() as u32).to_be_bytes());
    wire.extend(header);
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
    decoder.extend(&wire);
    let cmd = decoder.next_command().unwrap().unwrap();
    assert_eq!(
        (cmd.opaque, cmd.remark.as_deref(), cmd.ext_fields.len()),
        (9, None, 0)
    );
    assert!(cmd.is_response() && cmd.is_success());
}

#[test]
fn codec_rejects_malformed_frames_with_typed_errors() {
    let decode = |bytes: &[u8], max: usize| {
        let mut d = FrameDecoder::new(max);
        d.extend(bytes);
        d.next_command()
    };
    // An oversized declared length is refused from its 4 bytes alone: nothing is buffered for it.
    assert_eq!(
        decode(&u32::MAX.to_be_bytes(), DEFAULT_MAX_FRAME),
        Err(CodecError::FrameTooLarge {
            len: u32::MAX as usize,
            max: DEFAULT_MAX_FRAME
        })
    );
    assert_eq!(
        decode(&[0, 0, 0, 3, 0, 0, 0], 64),
        Err(CodecError::FrameTooShort { len: 3 })
    );
    // Header length 100 in a frame of 8.
    assert_eq!(
        decode(&[0, 0, 0, 8, 0, 0, 0, 100, b'{', b'}', 0, 0], 64),
        Err(CodecError::HeaderTooLong {
            header_len: 100,
            frame_len: 8
        })
    );
    // Serialisation type 1 (RocketMQ's binary header) is not spoken.
    assert_eq!(
        decode(&[0, 0, 0, 6, 1, 0, 0, 2, b'{', b'}'], 64),
        Err(CodecError::UnsupportedSerialization(1))
    );
    assert!(matches!(
        decode(&[0, 0, 0, 6, 0, 0, 0, 2, b'{', b'x'], 64),
        Err(CodecError::BadHeader(_))
    ));
    // A header missing `code` is malformed, not a default command.
    assert!(matches!(
        decode(&[0, 0, 0, 6, 0, 0, 0, 2, b'{', b'}'], 64),
        Err(CodecError::BadHeader(_))
    ));
    // Too large to send: refused before anything is written.
    let mut out = Vec::new();
    let big = RemotingCommand::request(1).with_body(vec![0u8; 200]);
    assert!(matches!(
        encode(&big, 128, &mut out),
        Err(CodecError::TooLargeToSend { .. })
    ));
    assert!(out.is_empty());
}

// ---------------------------------------------------------------- client

#[tokio::test(start_paused = true)]
async fn client_talks_to_the_mini_server() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let client = RemotingClient::connect(&server.addr().to_string(), ClientConfig::default())
        .await
        .unwrap();
    assert!(client.is_open());
    assert!(
        client
            .request(kv_put("k", "v1"))
            .await
            .unwrap()
            .is_success()
    );
    let got = client.request(kv_get("k")).await.unwrap();
    assert_eq!(got.field("value"), Some("v1"));
    let missing = client.request(kv_get("absent")).await.unwrap();
    assert_eq!(missing.code, code::QUERY_NOT_FOUND);
    let unknown = client
        .request(RemotingCommand::request(4242))
        .await
        .unwrap();
    assert_eq!(unknown.code, code::REQUEST_CODE_NOT_SUPPORTED);
    client.probe().await.unwrap();
    assert_eq!(client.pending(), 0);
    assert_eq!(server.stats().accepted, 1);
    assert_eq!(server.stats().responses, 5);
}

#[tokio::test(start_paused = true)]
async fn responses_out_of_order_reach_their_requests() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(read_request(&mut stream, &mut decoder).await.unwrap());
        }
        // Answer the last first, as the real name server did; echo each key as the value.
        let mut wire = Vec::new();
        for req in requests.iter().rev() {
            let reply = RemotingCommand::response_to(req, code::SUCCESS)
                .with_field("value", req.field("key").unwrap());
            wire.extend(frame(&reply));
        }
        write_all_flush(&mut stream, &wire).await;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    });
    let client = RemotingClient::connect(&addr, ClientConfig::default())
        .await
        .unwrap();
    let (a, b, c) = tokio::join!(
        client.request(kv_get("a")),
        client.request(kv_get("b")),
        client.request(kv_get("c")),
    );
    assert_eq!(a.unwrap().field("value"), Some("a"));
    assert_eq!(b.unwrap().field("value"), Some("b"));
    assert_eq!(c.unwrap().field("value"), Some("c"));
    client.close();
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_request_times_out_and_is_forgotten() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    server.set_behaviour(ServerBehaviour::Silent);
    let timeout = Duration::from_secs(2);
    let client = RemotingClient::connect(&server.addr().to_string(), config(timeout))
        .await
        .unwrap();
    let started = Instant::now();
    let err = client.request(kv_get("k")).await.unwrap_err();
    assert!(
        matches!(err, RemotingError::Timeout { timeout: t, .. } if t == timeout),
        "{err}"
    );
    assert!(started.elapsed() >= timeout);
    assert!(
        started.elapsed() < timeout + Duration::from_secs(1),
        "I16: ends by its deadline"
    );
    assert_eq!(
        client.pending(),
        0,
        "a timed-out request leaves nothing behind"
    );
    // A timeout is not a dead connection.
    assert!(client.is_open());
    server.set_behaviour(ServerBehaviour::Normal);
    assert!(client.request(kv_get("k")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_future_is_forgotten() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    server.set_delay(Duration::from_secs(30));
    let client =
        RemotingClient::connect(&server.addr().to_string(), config(Duration::from_secs(60)))
            .await
            .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(1), client.request(kv_get("k"))).await;
    assert!(outcome.is_err(), "cancelled by the outer timeout");
    assert_eq!(client.pending(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_dying_connection_fails_pending_requests_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        // Take two requests, answer neither, hang up.
        read_request(&mut stream, &mut decoder).await.unwrap();
        read_request(&mut stream, &mut decoder).await.unwrap();
        drop(stream);
    });
    let client = RemotingClient::connect(&addr, config(Duration::from_secs(60)))
        .await
        .unwrap();
    let started = Instant::now();
    let (a, b) = tokio::join!(client.request(kv_get("a")), client.request(kv_get("b")));
    for result in [a, b] {
        assert!(
            matches!(result, Err(RemotingError::Closed(_))),
            "{result:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failed promptly, not at the 60 s timeout"
    );
    assert!(!client.is_open());
    assert!(client.close_reason().unwrap().contains("peer"));
    // Later requests fail at once too.
    let err = client.request(kv_get("c")).await.unwrap_err();
    assert!(matches!(err, RemotingError::Closed(_)));
    assert!(client.send_oneway(kv_get("d")).await.is_err());
    server.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_oversized_frame_from_the_peer_closes_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
        read_request(&mut stream, &mut decoder).await.unwrap();
        // Declares 4 GiB: the client must refuse it without allocating, and hang up.
        write_all_flush(&mut stream, &u32::MAX.to_be_bytes()).await;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    });
    let client = RemotingClient::connect(&addr, config(Duration::from_secs(60)))
        .await
        .unwrap();
    let err = client.request(kv_get("a")).await.unwrap_err();
    assert!(
        matches!(&err, RemotingError::Closed(reason) if reason.contains("exceeds")),
        "{err}"
    );
    assert!(!client.is_open());
    // The server's read_to_end ends: the client closed its socket.
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn close_fails_pending_requests_and_closes_the_socket() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    server.set_delay(Duration::from_secs(30));
    let client =
        RemotingClient::connect(&server.addr().to_string(), config(Duration::from_secs(60)))
            .await
            .unwrap();
    let other = client.clone();
    let pending = tokio::spawn(async move { other.request(kv_get("k")).await });
    // Let the request reach the server before closing.
    for _ in 0..100 {
        if server.stats().requests == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(server.stats().requests, 1);
    client.close();
    assert!(!client.is_open());
    let result = pending.await.unwrap();
    assert!(
        matches!(result, Err(RemotingError::Closed(_))),
        "{result:?}"
    );
    // The server sees the connection end.
    for _ in 0..100 {
        if server.stats().open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().open, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_closes_the_connection() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let client = RemotingClient::connect(&server.addr().to_string(), ClientConfig::default())
        .await
        .unwrap();
    client.probe().await.unwrap();
    assert_eq!(server.stats().open, 1);
    drop(client);
    for _ in 0..100 {
        if server.stats().open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().open, 0);
}

#[tokio::test(start_paused = true)]
async fn one_way_requests_get_no_response() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let client = RemotingClient::connect(&server.addr().to_string(), ClientConfig::default())
        .await
        .unwrap();
    client.send_oneway(kv_put("k", "one-way")).await.unwrap();
    // Frames on one connection are handled in order, so the get sees the put.
    let got = client.request(kv_get("k")).await.unwrap();
    assert_eq!(got.field("value"), Some("one-way"));
    let stats = server.stats();
    assert_eq!((stats.requests, stats.responses), (2, 1));
    assert_eq!(client.pending(), 0);
    let _ = FLAG_ONEWAY;
}

#[tokio::test(start_paused = true)]
async fn a_stopped_server_refuses_and_a_restarted_one_serves_again() {
    let mut server = MiniServer::start(STOPPABLE_ADDR).await.unwrap();
    let addr = server.addr().to_string();
    let client = RemotingClient::connect(&addr, config(Duration::from_secs(60)))
        .await
        .unwrap();
    client.probe().await.unwrap();
    server.stop().await;
    let err = client.request(kv_get("k")).await.unwrap_err();
    assert!(matches!(err, RemotingError::Closed(_)), "{err}");
    assert!(!client.is_open());
    assert!(matches!(
        RemotingClient::connect(&addr, ClientConfig::default()).await,
        Err(RemotingError::Connect(_))
    ));
    server.restart().await.unwrap();
    let again = RemotingClient::connect(&addr, ClientConfig::default())
        .await
        .unwrap();
    again.probe().await.unwrap();
    assert_eq!(server.stats().accepted, 2);
}

// ---------------------------------------------------------------- through the pool

fn pool(timeout: Duration) -> ConnectionPool<RemotingClient, RemotingConnector> {
    ConnectionPool::builder()
        .max_connections(8)
        .consecutive_failures(3)
        .backoff(Duration::from_secs(1), Duration::from_secs(8), 0.0)
        .connector(RemotingConnector::new(config(timeout)))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_pool_connects_a_ready_client_and_records_calls() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let addr: CheetahString = server.addr().to_string().into();
    let pool = pool(Duration::from_secs(1));
    let conn = pool.get_or_connect(&addr).await.unwrap();
    assert!(conn.client().is_open());
    pool.probe(&conn).await.unwrap();
    pool_request(&pool, &addr, kv_put("k", "v")).await.unwrap();
    let got = pool_request(&pool, &addr, kv_get("k")).await.unwrap();
    assert_eq!(got.field("value"), Some("v"));
    // An application-level "not found" is an answer from a working server: a success.
    let missing = pool_request(&pool, &addr, kv_get("absent")).await.unwrap();
    assert_eq!(missing.code, code::QUERY_NOT_FOUND);
    let m = conn.metrics();
    assert_eq!(
        (m.success_count(), m.total_errors(), m.in_flight()),
        (4, 0, 0)
    );
    assert_eq!(pool.stats().connects.succeeded, 1);
    assert_eq!(server.stats().accepted, 1, "one connection, reused");
    // Many concurrent calls share the one connection.
    let calls =
        (0..50).map(|i| pool_request(&pool, &addr, kv_get(if i % 2 == 0 { "k" } else { "x" })));
    let results = futures_join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(server.stats().accepted, 1);
    assert_eq!(conn.metrics().success_count(), 54);
}

/// A minimal join_all (keeps the dev-dependencies lean): spawns nothing, polls all.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, out) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

#[tokio::test(start_paused = true)]
async fn timeouts_and_server_errors_count_as_failures_and_evict() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let addr: CheetahString = server.addr().to_string().into();
    let pool = pool(Duration::from_millis(500));
    let conn = pool.get_or_connect(&addr).await.unwrap();
    server.set_behaviour(ServerBehaviour::SystemError);
    let answer = pool_request(&pool, &addr, kv_get("k")).await.unwrap();
    assert_eq!(answer.code, code::SYSTEM_ERROR);
    server.set_behaviour(ServerBehaviour::Silent);
    for _ in 0..2 {
        let err = pool_request(&pool, &addr, kv_get("k")).await.unwrap_err();
        assert!(
            matches!(err, CallError::Remoting(RemotingError::Timeout { .. })),
            "{err}"
        );
    }
    // I9: three consecutive failures reach the threshold: no longer handed out, then evicted.
    assert_eq!(conn.metrics().consecutive_errors(), 3);
    assert!(!conn.is_healthy());
    assert!(pool.get(&addr).is_none());
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert_eq!(pool.stats().evictions.unhealthy, 1);
    assert!(
        !conn.client().is_open(),
        "the pool closed the evicted client"
    );
    // I12: the address backs off; the next call is refused without a connect.
    let err = pool_request(&pool, &addr, kv_get("k")).await.unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Backoff { .. })),
        "{err}"
    );
    // After the backoff, a healthy server gets a fresh connection.
    server.set_behaviour(ServerBehaviour::Normal);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    pool_request(&pool, &addr, kv_put("k", "back"))
        .await
        .unwrap();
    let fresh = pool.get(&addr).unwrap();
    assert_ne!(fresh.id(), conn.id());
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test(start_paused = true)]
async fn a_killed_server_is_evicted_as_closed_and_reconnected_after_backoff() {
    let mut server = MiniServer::start(STOPPABLE_ADDR).await.unwrap();
    let addr: CheetahString = server.addr().to_string().into();
    let pool = pool(Duration::from_secs(60));
    pool_request(&pool, &addr, kv_put("k", "v")).await.unwrap();
    let first = pool.get(&addr).unwrap();
    // A call in flight when the server dies fails at once and counts against the connection.
    server.set_delay(Duration::from_secs(30));
    let in_flight = tokio::spawn({
        let pool = pool.clone();
        let addr = addr.clone();
        async move { pool_request(&pool, &addr, kv_get("k")).await }
    });
    wait_until(|| server.stats().requests == 2).await;
    let started = Instant::now();
    server.stop().await;
    let err = in_flight.await.unwrap().unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "not at the 60 s timeout"
    );
    assert!(
        matches!(err, CallError::Remoting(RemotingError::Closed(_))),
        "{err}"
    );
    assert_eq!(first.metrics().total_errors(), 1);
    assert!(!first.client().is_open());
    // I8: a connection whose transport is known closed is never handed out; the sweep evicts it.
    assert!(pool.get(&addr).is_none());
    assert_eq!(pool.evict_unhealthy().await, 1);
    assert!(pool.is_empty());
    let evictions = pool.stats().evictions;
    assert_eq!(evictions.closed + evictions.unhealthy, 1);
    // The connection died young: its address backs off at once (I12). A topology signal
    // (`mark_up`) ends that; then connecting to the dead address fails and backs off again.
    let err = pool_request(&pool, &addr, kv_get("k")).await.unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Backoff { failures: 1, .. })),
        "{err}"
    );
    pool.mark_up(&addr);
    let err = pool_request(&pool, &addr, kv_get("k")).await.unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Connect { .. })),
        "{err}"
    );
    let err = pool_request(&pool, &addr, kv_get("k")).await.unwrap_err();
    assert!(
        matches!(err, CallError::Pool(PoolError::Backoff { .. })),
        "{err}"
    );
    assert_eq!(pool.stats().connects.failed, 1);
    server.set_delay(Duration::ZERO);
    server.restart().await.unwrap();
    let until = pool.backoff_until(&addr).expect("backing off");
    tokio::time::sleep_until(until + Duration::from_millis(1)).await;
    // I15: faults over, the next call reconnects.
    pool_request(&pool, &addr, kv_get("k")).await.unwrap();
    assert_ne!(pool.get(&addr).unwrap().id(), first.id());
    // The reconnect does not forget the failure; the count decays while the address stays quiet.
    assert_eq!(pool.ejection_count(&addr), 1);
}

/// Polls `done` in virtual time, at most 1000 times 1 ms.
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(done(), "condition not reached within 1 s");
}

#[tokio::test(start_paused = true)]
async fn a_late_response_is_dropped_not_given_to_another_request() {
    let server = MiniServer::start("127.0.0.1:0").await.unwrap();
    let client =
        RemotingClient::connect(&server.addr().to_string(), config(Duration::from_secs(1)))
            .await
            .unwrap();
    client.request(kv_put("k", "v")).await.unwrap();
    server.set_delay(Duration::from_secs(3));
    let err = client.request(kv_get("k")).await.unwrap_err();
    assert!(matches!(err, RemotingError::Timeout { .. }), "{err}");
    // The late answer arrives while the next request waits; the next request gets its own.
    server.set_delay(Duration::from_secs(4));
    let started = Instant::now();
    let own = client
        .request_timeout(kv_get("absent"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        own.code,
        code::QUERY_NOT_FOUND,
        "not the late answer to the first get"
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
    assert_eq!(server.stats().responses, 3);
    assert!(client.is_open());
}
