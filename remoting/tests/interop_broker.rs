//! Interop: the pool and its remoting transport doing what a RocketMQ producer does, against a real
//! name server and a real broker (`rocketmq-namesrv-rust` and `rocketmq-broker-rust` from the
//! `rocketmq-namesrv` and `rocketmq-broker` 1.0.0 crates; `scripts/install-rocketmq.sh` installs
//! both). Real processes and real time, so not under madsim.
//!
//! The binaries are looked up in `KEYED_POOL_NAMESRV_BIN` / `KEYED_POOL_BROKER_BIN`, then on `PATH`,
//! then in `$CARGO_HOME/bin`. Without them (as the build script finds them) the test is reported as
//! ignored, with the command that installs them; `.ci/run` installs them and requires the test to
//! have run. If one disappears between the build and the run, the test fails under
//! `KEYED_POOL_REQUIRE_BROKER=1`.
//!
//! Everything stays on 127.0.0.1 and under a temporary directory: the broker gets a TOML config
//! binding its three listeners (remoting `P`, fast remoting `P - 2`, HA) to loopback and putting its
//! store there, and `HOME`/`ROCKETMQ_HOME` point there too. Both processes are killed on drop.
#![cfg(not(madsim))]

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keyed_pool::core::EjectionPolicy;
use keyed_pool::{CheetahString, ConnectionPool};
use keyed_pool_remoting::codec::code;
use keyed_pool_remoting::{
    CallError, ClientConfig, RemotingClient, RemotingCommand, RemotingConnector, RemotingError,
    pool_request,
};

const NAMESRV_BINARY: &str = "rocketmq-namesrv-rust";
const BROKER_BINARY: &str = "rocketmq-broker-rust";
const INSTALL: &str = "bash scripts/install-rocketmq.sh";

/// The topic a broker with `autoCreateTopicEnable` registers, and that a producer falls back to
/// when its own topic has no route yet (RocketMQ's `TopicValidator::AUTO_CREATE_TOPIC_KEY_TOPIC`).
const DEFAULT_TOPIC: &str = "TBW102";
/// Write queues asked for when the broker creates the topic on its first message.
const QUEUES: i32 = 4;
const PRODUCER_GROUP: &str = "keyed-pool-interop-producer";
const CONSUMER_GROUP: &str = "keyed-pool-interop-reader";

/// Request codes and response codes this test uses beyond the crate's `code` module (values from
/// RocketMQ's `RequestCode` and `ResponseCode`).
mod rmq {
    /// Response to SEND_MESSAGE: stored, but the flush to disk timed out.
    pub const FLUSH_DISK_TIMEOUT: i32 = 10;
    /// `PullSysFlag`: the request carries its subscription expression.
    pub const PULL_FLAG_SUBSCRIPTION: i32 = 1 << 2;
    /// `MessageSysFlag`: the stored message's hosts are IPv6 (16-byte addresses).
    pub const BORNHOST_V6_FLAG: i32 = 1 << 4;
    pub const STOREHOSTADDRESS_V6_FLAG: i32 = 1 << 5;
    /// Magic codes of a stored message: V1 has a 1-byte topic length, V2 a 2-byte one.
    pub const MESSAGE_MAGIC_CODE_V1: i32 = -626_843_481;
    pub const MESSAGE_MAGIC_CODE_V2: i32 = -626_843_477;
}

// ---------------------------------------------------------------------------------------------
// The pool, in two helpers: building it and sending through it. Besides these the test only reads
// it (`get`, `probe`, `stats`) and closes it, so an API change touches little here.

type Pool = ConnectionPool<RemotingClient, RemotingConnector>;

fn build_pool() -> Pool {
    ConnectionPool::builder()
        .max_connections(4)
        .consecutive_failures(3)
        .backoff(Duration::from_millis(100), Duration::from_millis(500), 0.0)
        // A connection that dies young is not held against the address: the restart below is the
        // broker's, not a flapping address's.
        .ejection(EjectionPolicy {
            short_lived: Duration::ZERO,
            ..EjectionPolicy::default()
        })
        .connect_timeout(Duration::from_secs(2))
        .connector(RemotingConnector::new(
            ClientConfig::default().request_timeout(Duration::from_secs(3)),
        ))
        .build::<RemotingClient>()
        .expect("valid config")
}

async fn call(pool: &Pool, addr: &str, cmd: RemotingCommand) -> Result<RemotingCommand, CallError> {
    pool_request(pool, &CheetahString::from(addr), cmd).await
}

// ---------------------------------------------------------------------------------------------
// The server processes.

fn find_binary(binary: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(binary));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join(binary));
    on_path.chain(cargo_home).find(|p| p.is_file())
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A free port `p` whose `p - 2` is free too (the broker's fast remoting listener).
fn free_broker_port() -> u16 {
    for _ in 0..100 {
        let main = StdListener::bind("127.0.0.1:0").expect("a free port");
        let port = main.local_addr().expect("local addr").port();
        if port > 1026 && StdListener::bind(("127.0.0.1", port - 2)).is_ok() {
            return port;
        }
    }
    panic!("no free port p with p - 2 free in 100 tries");
}

/// A server child process in its own directory; killed on drop (the directory goes with the
/// [`Cluster`]).
struct Process {
    name: &'static str,
    command: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Process {
    fn new(name: &'static str, binary: &Path, args: &[String], dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("process dir");
        let mut command = vec![binary.display().to_string()];
        command.extend(args.iter().cloned());
        Self {
            name,
            command,
            dir,
            child: None,
            starts: 0,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("ROCKETMQ_HOME", &self.dir)
            .env_remove("NAMESRV_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL, as a crash: no shutdown hook runs.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{} exited with {status}:\n{}", self.name, self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(30).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A name server and a broker registered with it, on loopback, under one temporary directory.
struct Cluster {
    root: PathBuf,
    /// The broker's store: under `root`, or elsewhere (see [`store_dir`]).
    store: PathBuf,
    namesrv: Process,
    broker: Process,
    namesrv_addr: String,
    broker_addr: String,
    broker_name: String,
}

impl Cluster {
    fn start(namesrv_bin: &Path, broker_bin: &Path) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "keyed-pool-broker-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let namesrv_port = free_port();
        let namesrv_dir = root.join("namesrv");
        let namesrv_args = [
            "--listenPort".to_string(),
            namesrv_port.to_string(),
            "--bindAddress".to_string(),
            "127.0.0.1".to_string(),
            "--rocketmqHome".to_string(),
            namesrv_dir.display().to_string(),
            "--kvConfigPath".to_string(),
            namesrv_dir.join("kvConfig.json").display().to_string(),
        ];
        let mut namesrv = Process::new("namesrv", namesrv_bin, &namesrv_args, namesrv_dir);
        namesrv.spawn();

        let namesrv_addr = format!("127.0.0.1:{namesrv_port}");
        let broker_port = free_broker_port();
        let ha_port = loop {
            let port = free_port();
            if port != broker_port && port != broker_port - 2 {
                break port;
            }
        };
        let broker_dir = root.join("broker");
        std::fs::create_dir_all(&broker_dir).expect("broker dir");
        let store = store_dir(&root, &broker_dir);
        let broker_name = format!("keyed-pool-broker-{}", std::process::id());
        let config = broker_dir.join("broker.toml");
        std::fs::write(
            &config,
            broker_config(&namesrv_addr, broker_port, ha_port, &store, &broker_name),
        )
        .expect("broker config");
        let broker_args = ["-c".to_string(), config.display().to_string()];
        let broker = Process::new("broker", broker_bin, &broker_args, broker_dir);
        Self {
            root,
            store,
            namesrv,
            broker,
            namesrv_addr,
            broker_addr: format!("127.0.0.1:{broker_port}"),
            broker_name,
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- name server log (tail):\n{}\n--- broker log (tail):\n{}",
            self.namesrv.log_tail(),
            self.broker.log_tail()
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.broker.kill();
        self.namesrv.kill();
        if std::env::var_os("KEYED_POOL_KEEP_BROKER_DIR").is_some() {
            eprintln!(
                "interop_broker: kept {} (store: {})",
                self.root.display(),
                self.store.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.store);
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// The share of a filesystem the broker counts as used, `(total - available) / total` (as
/// `rocketmq-store` 1.0.0 samples it), and the bytes available; from `df -Pk`.
fn disk_usage(path: &Path) -> Option<(f64, u64)> {
    let out = Command::new("df").arg("-Pk").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().nth(1)?.split_whitespace().collect();
    let total: u64 = fields.get(1)?.parse().ok()?;
    let available: u64 = fields.get(3)?.parse().ok()?;
    (total > 0).then(|| {
        (
            (total - available.min(total)) as f64 / total as f64,
            available * 1024,
        )
    })
}

/// Where the broker's store goes. The broker refuses to start (its readiness check fails, the
/// process exits 70 with "Service lifecycle operation failed") when the store's filesystem is more
/// than 90 % used by its measure, which counts space reserved for root: a nearly full shared disk
/// would fail this test for a reason that is not the pool's. So: `KEYED_POOL_BROKER_STORE_DIR` if
/// set; else under the test's temporary directory if that filesystem is below 80 %; else on
/// `/dev/shm` (memory; it survives the broker's SIGKILL as a disk would) if that is; else the test
/// stops and says why.
fn store_dir(root: &Path, broker_dir: &Path) -> PathBuf {
    const NEEDED: u64 = 32 << 20;
    let name = root.file_name().expect("a named temporary directory");
    if let Some(dir) = std::env::var_os("KEYED_POOL_BROKER_STORE_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let candidates = [broker_dir.to_path_buf(), PathBuf::from("/dev/shm")];
    let mut seen = Vec::new();
    for dir in &candidates {
        match disk_usage(dir) {
            Some((used, available)) if used < 0.80 && available >= NEEDED => {
                if dir != broker_dir {
                    eprintln!(
                        "interop_broker: the store goes to {} ({} is {:.0} % used, the broker \
                         refuses to start above 90 %)",
                        dir.display(),
                        seen.first()
                            .map_or(String::new(), |(d, _): &(PathBuf, f64)| d
                                .display()
                                .to_string()),
                        seen.first().map_or(0.0, |(_, u)| u * 100.0)
                    );
                }
                return if dir == broker_dir {
                    dir.join("store")
                } else {
                    dir.join(name)
                };
            }
            Some((used, _)) => seen.push((dir.clone(), used)),
            None => {}
        }
    }
    panic!(
        "no filesystem for the broker's store below 80 % used (by (total - available) / total) \
         with 32 MiB free: {seen:?}; rocketmq-broker refuses to start above 90 %. Free some \
         space or set KEYED_POOL_BROKER_STORE_DIR"
    );
}

/// The broker's configuration: every listener on loopback, the store in its directory, a sync
/// flush (so an acknowledged message is on disk and survives the SIGKILL below), small commit-log
/// files.
fn broker_config(
    namesrv_addr: &str,
    port: u16,
    ha_port: u16,
    store: &Path,
    broker_name: &str,
) -> String {
    let store = store.display();
    format!(
        r#"[broker]
namesrvAddr = "{namesrv_addr}"
brokerIp1 = "127.0.0.1"
listenPort = {port}
storePathRootDir = "{store}"
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true

[broker.brokerServerConfig]
bindAddress = "127.0.0.1"

[broker.brokerIdentity]
brokerName = "{broker_name}"
brokerClusterName = "keyed-pool-interop"
brokerId = 0

[store]
storePathRootDir = "{store}"
haListenAddress = "127.0.0.1"
haListenPort = {ha_port}
brokerRole = "ASYNC_MASTER"
flushDiskType = "SYNC_FLUSH"
mappedFileSizeCommitLog = 16777216
mappedFileSizeConsumeQueue = 120000
maxHashSlotNum = 4096
maxIndexNum = 16384
"#
    )
}

// ---------------------------------------------------------------------------------------------
// The protocol: route lookup, send, pull.

fn route_request(topic: &str) -> RemotingCommand {
    RemotingCommand::request(code::GET_ROUTEINFO_BY_TOPIC)
        .with_field("topic", topic)
        .with_field("acceptStandardJsonOnly", "true")
}

/// What a producer takes from a topic route: the master's address and the write queue count of
/// each broker.
#[derive(Debug)]
struct Route {
    /// broker name → master (broker id 0) address
    masters: BTreeMap<String, String>,
    /// broker name → write queues
    write_queues: BTreeMap<String, i32>,
}

fn parse_route(body: &[u8]) -> Route {
    let text = String::from_utf8_lossy(body);
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("route body is not JSON ({e}): {text}"));
    let mut masters = BTreeMap::new();
    for broker in json["brokerDatas"].as_array().into_iter().flatten() {
        let name = broker["brokerName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(addr) = broker["brokerAddrs"]["0"].as_str() {
            masters.insert(name, addr.to_string());
        }
    }
    let mut write_queues = BTreeMap::new();
    for queue in json["queueDatas"].as_array().into_iter().flatten() {
        let name = queue["brokerName"].as_str().unwrap_or_default().to_string();
        let n = queue["writeQueueNums"].as_i64().unwrap_or_default();
        write_queues.insert(name, i32::try_from(n).expect("queue count"));
    }
    Route {
        masters,
        write_queues,
    }
}

/// The route of `topic`, or `None` while the name server says TOPIC_NOT_EXIST.
async fn lookup(pool: &Pool, namesrv: &str, topic: &str) -> Option<Route> {
    let response = call(pool, namesrv, route_request(topic))
        .await
        .expect("route lookup at the name server");
    match response.code {
        code::SUCCESS => Some(parse_route(&response.body)),
        code::TOPIC_NOT_EXIST => None,
        other => panic!("route lookup of {topic} answered {other}: {response:?}"),
    }
}

fn body_of(run: &str, id: usize) -> String {
    format!("keyed-pool interop {run} message #{id}")
}

fn key_of(id: usize) -> String {
    format!("kp-{id}")
}

/// SEND_MESSAGE (code 10) of message `id` to queue `queue`; `defaultTopic` lets the broker create
/// the topic on its first message, as it does for a producer that found no route.
fn send_request(topic: &str, queue: i32, run: &str, id: usize) -> RemotingCommand {
    let born = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    // Message properties: `name \x01 value \x02`...
    let properties = format!("KEYS\u{1}{}\u{2}WAIT\u{1}true\u{2}", key_of(id));
    RemotingCommand::request(code::SEND_MESSAGE)
        .with_field("producerGroup", PRODUCER_GROUP)
        .with_field("topic", topic)
        .with_field("defaultTopic", DEFAULT_TOPIC)
        .with_field("defaultTopicQueueNums", QUEUES.to_string())
        .with_field("queueId", queue.to_string())
        .with_field("sysFlag", "0")
        .with_field("bornTimestamp", born.to_string())
        .with_field("flag", "0")
        .with_field("properties", properties)
        .with_field("reconsumeTimes", "0")
        .with_field("unitMode", "false")
        .with_field("batch", "false")
        .with_body(body_of(run, id).into_bytes())
}

/// PULL_MESSAGE (code 11) of up to `max` messages of `queue` from `offset`, with its own
/// subscription (`*`) and no long polling.
fn pull_request(topic: &str, queue: i32, offset: i64, max: i32) -> RemotingCommand {
    RemotingCommand::request(code::PULL_MESSAGE)
        .with_field("consumerGroup", CONSUMER_GROUP)
        .with_field("topic", topic)
        .with_field("queueId", queue.to_string())
        .with_field("queueOffset", offset.to_string())
        .with_field("maxMsgNums", max.to_string())
        .with_field("sysFlag", rmq::PULL_FLAG_SUBSCRIPTION.to_string())
        .with_field("commitOffset", "0")
        .with_field("suspendTimeoutMillis", "0")
        .with_field("subscription", "*")
        .with_field("subVersion", "0")
        .with_field("expressionType", "TAG")
}

/// One message as the broker stored it.
#[derive(Debug, Clone)]
struct Stored {
    topic: String,
    queue: i32,
    offset: i64,
    body: Vec<u8>,
}

/// Decodes the body of a pull response: stored messages back to back, each
/// `size i32 | magic i32 | body crc i32 | queue id i32 | flag i32 | queue offset i64 |
/// commit-log offset i64 | sys flag i32 | born timestamp i64 | born host (4|16 + 4) |
/// store timestamp i64 | store host (4|16 + 4) | reconsume times i32 | prepared tx offset i64 |
/// body (i32 length) | topic (u8 length in V1, i16 in V2) | properties (i16 length)`.
fn decode_stored(mut bytes: &[u8]) -> Vec<Stored> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
        assert!(bytes.len() >= n, "truncated stored message");
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        head
    }
    fn i32_of(bytes: &mut &[u8]) -> i32 {
        i32::from_be_bytes(take(bytes, 4).try_into().expect("4 bytes"))
    }
    fn i64_of(bytes: &mut &[u8]) -> i64 {
        i64::from_be_bytes(take(bytes, 8).try_into().expect("8 bytes"))
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let size = usize::try_from(i32::from_be_bytes(
            bytes.first_chunk::<4>().copied().expect("a message size"),
        ))
        .expect("message size");
        assert!(
            size >= 4 && size <= bytes.len(),
            "bad stored message size {size}"
        );
        let mut msg = take(&mut bytes, size);
        let _size = i32_of(&mut msg);
        let magic = i32_of(&mut msg);
        assert!(
            magic == rmq::MESSAGE_MAGIC_CODE_V1 || magic == rmq::MESSAGE_MAGIC_CODE_V2,
            "unknown magic code {magic}"
        );
        let _body_crc = i32_of(&mut msg);
        let queue = i32_of(&mut msg);
        let _flag = i32_of(&mut msg);
        let offset = i64_of(&mut msg);
        let _commit_log_offset = i64_of(&mut msg);
        let sys_flag = i32_of(&mut msg);
        let _born = i64_of(&mut msg);
        let born_host = if sys_flag & rmq::BORNHOST_V6_FLAG != 0 {
            20
        } else {
            8
        };
        take(&mut msg, born_host);
        let _stored_at = i64_of(&mut msg);
        let store_host = if sys_flag & rmq::STOREHOSTADDRESS_V6_FLAG != 0 {
            20
        } else {
            8
        };
        take(&mut msg, store_host);
        let _reconsume = i32_of(&mut msg);
        let _prepared = i64_of(&mut msg);
        let body_len = usize::try_from(i32_of(&mut msg)).expect("body length");
        let body = take(&mut msg, body_len).to_vec();
        let topic_len = if magic == rmq::MESSAGE_MAGIC_CODE_V2 {
            usize::from(u16::from_be_bytes(take(&mut msg, 2).try_into().expect("2")))
        } else {
            usize::from(take(&mut msg, 1)[0])
        };
        let topic = String::from_utf8_lossy(take(&mut msg, topic_len)).into_owned();
        out.push(Stored {
            topic,
            queue,
            offset,
            body,
        });
    }
    out
}

fn field<T: std::str::FromStr>(response: &RemotingCommand, name: &str) -> T {
    response
        .field(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("response without a numeric {name}: {response:?}"))
}

/// Every message of `topic` in queues `0..queues`, pulled from offset 0 up to each queue's max
/// offset (bounded by `deadline`: the broker may still be rebuilding its consume queues after the
/// restart).
async fn read_back(
    pool: &Pool,
    broker: &str,
    topic: &str,
    queues: i32,
    limit: Duration,
) -> Vec<Stored> {
    let deadline = Instant::now() + limit;
    let mut all = Vec::new();
    for queue in 0..queues {
        let mut offset = 0i64;
        loop {
            assert!(
                Instant::now() < deadline,
                "read-back of queue {queue} not done within {limit:?}"
            );
            let response = match call(pool, broker, pull_request(topic, queue, offset, 32)).await {
                Ok(response) => response,
                Err(e) => {
                    eprintln!(
                        "interop_broker: pull of queue {queue} at {offset} failed ({e}); again"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match response.code {
                code::SUCCESS => {
                    let messages = decode_stored(&response.body);
                    assert!(
                        !messages.is_empty(),
                        "a FOUND pull with no message: {response:?}"
                    );
                    let next: i64 = field(&response, "nextBeginOffset");
                    assert!(next > offset, "the pull did not advance: {response:?}");
                    all.extend(messages);
                    offset = next;
                }
                code::PULL_NOT_FOUND | code::PULL_RETRY_IMMEDIATELY | code::PULL_OFFSET_MOVED => {
                    let max: i64 = field(&response, "maxOffset");
                    if offset >= max {
                        break;
                    }
                    if response.code == code::PULL_OFFSET_MOVED {
                        offset = field(&response, "nextBeginOffset");
                    } else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                other => panic!("pull of queue {queue} at {offset} answered {other}: {response:?}"),
            }
        }
    }
    all
}

// ---------------------------------------------------------------------------------------------
// The producers' books.
//
// Every send ends in exactly one outcome, told to its caller:
// - **acknowledged** (SUCCESS, with the queue and offset the broker stored it at): it must then be
//   found on the broker exactly once, at that queue and offset, with its body;
// - **reported failed**, in three kinds:
//   - *not sent*: the pool had no connection to give (the connect was refused, the address was
//     backing off): the request never left, so it must **not** be found;
//   - *no answer*: the request may have left, but its connection died (or it timed out) before a
//     response came: the broker may have stored it or not, and both are allowed (the caller was
//     told it failed, so a retry would be its own decision); the test counts how many were stored;
//   - *refused*: the broker answered with an error code (SYSTEM_BUSY from its flow control, for
//     one): must not be found, except FLUSH_DISK_TIMEOUT, which says stored-but-not-flushed.
// A message found on the broker that was never acknowledged is therefore allowed only as a *no
// answer* (or FLUSH_DISK_TIMEOUT) failure; none may be found twice; no two acknowledgements may
// name the same queue offset (a response delivered to the wrong request would).

/// What a send told its caller.
#[derive(Debug, Clone)]
enum Outcome {
    /// SUCCESS, with where the broker says it stored the message.
    Acked {
        queue: i32,
        offset: i64,
        at: Instant,
    },
    /// The pool had no connection (backoff, refused connect...): the request never left. With the
    /// `PoolError` variant.
    NotSent(String),
    /// No answer: the connection died or the request timed out. With the `RemotingError` variant.
    NoAnswer(String),
    /// The broker answered with an error code.
    Refused(i32, Option<String>),
}

impl Outcome {
    /// A short label, for the summary: "acknowledged", "not sent (Backoff)", "refused (2
    /// [TIMEOUT_CLEAN_QUEUE])"...
    fn kind(&self) -> String {
        match self {
            Self::Acked { .. } => "acknowledged".into(),
            Self::NotSent(variant) => format!("not sent ({variant})"),
            Self::NoAnswer(variant) => format!("no answer ({variant})"),
            Self::Refused(code, remark) => {
                match remark.as_deref().and_then(|r| r.split_once(']')) {
                    Some((tag, _)) => format!("refused ({code} {tag}])"),
                    None => format!("refused ({code})"),
                }
            }
        }
    }
}

/// The name of an error's variant, from its Debug form (`Backoff { .. }` → `Backoff`).
fn variant(error: &impl std::fmt::Debug) -> String {
    let debug = format!("{error:?}");
    debug
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn classify(result: Result<RemotingCommand, CallError>) -> Outcome {
    match result {
        Ok(response) if response.code == code::SUCCESS => Outcome::Acked {
            queue: field(&response, "queueId"),
            offset: field(&response, "queueOffset"),
            at: Instant::now(),
        },
        Ok(response) => Outcome::Refused(response.code, response.remark),
        Err(CallError::Pool(e)) => Outcome::NotSent(variant(&e)),
        Err(CallError::Remoting(
            e @ (RemotingError::Closed(_) | RemotingError::Timeout { .. }),
        )) => Outcome::NoAnswer(variant(&e)),
        Err(other) => panic!("unexpected send error: {other}"),
    }
}

/// When a send started, relative to the broker's crash.
const BEFORE_KILL: u8 = 0;
const BROKER_DOWN: u8 = 1;
const AFTER_RESTART: u8 = 2;
const PHASES: [&str; 3] = ["before the kill", "broker down", "after the restart"];

#[derive(Default)]
struct Books {
    /// id → (phase at send, outcome)
    outcomes: Mutex<HashMap<usize, (u8, Outcome)>>,
    phase: AtomicU8,
    acked: AtomicUsize,
    acked_after_restart: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(broker_found),
    ignore = "rocketmq-namesrv-rust or rocketmq-broker-rust not found: run `bash scripts/install-rocketmq.sh` to run this test"
)]
async fn a_producer_through_the_pool_loses_no_acknowledged_message_when_the_broker_restarts() {
    let (Some(namesrv_bin), Some(broker_bin)) = (
        find_binary(NAMESRV_BINARY, "KEYED_POOL_NAMESRV_BIN"),
        find_binary(BROKER_BINARY, "KEYED_POOL_BROKER_BIN"),
    ) else {
        let required = std::env::var("KEYED_POOL_REQUIRE_BROKER").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "KEYED_POOL_REQUIRE_BROKER=1 but {NAMESRV_BINARY} or {BROKER_BINARY} was not found \
             (KEYED_POOL_NAMESRV_BIN / KEYED_POOL_BROKER_BIN, PATH, $CARGO_HOME/bin); run {INSTALL}"
        );
        eprintln!(
            "SKIPPED interop_broker: {NAMESRV_BINARY} or {BROKER_BINARY} not found (run {INSTALL}; \
             KEYED_POOL_REQUIRE_BROKER=1 makes this a failure)"
        );
        return;
    };
    eprintln!(
        "interop_broker: using {} and {}",
        namesrv_bin.display(),
        broker_bin.display()
    );
    let test_start = Instant::now();
    let mut cluster = Cluster::start(&namesrv_bin, &broker_bin);
    let pool = build_pool();
    let namesrv = cluster.namesrv_addr.clone();
    let run = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    );
    let topic = format!("keyed-pool-interop-{}", std::process::id());

    // --- Route lookup, as a producer: the topic has no route yet, so it takes the default topic's,
    // which the broker registers at the name server once it is up.
    cluster.broker.spawn();
    let up = Instant::now();
    let route = loop {
        cluster.namesrv.assert_running();
        cluster.broker.assert_running();
        if let Ok(response) = call(&pool, &namesrv, route_request(DEFAULT_TOPIC)).await
            && response.code == code::SUCCESS
        {
            break parse_route(&response.body);
        }
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "the broker did not register {DEFAULT_TOPIC} within 30 s:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let registered_after = up.elapsed();
    assert!(
        lookup(&pool, &namesrv, &topic).await.is_none(),
        "a fresh topic has no route"
    );
    let broker = route
        .masters
        .get(&cluster.broker_name)
        .unwrap_or_else(|| panic!("our broker is not in the route of {DEFAULT_TOPIC}: {route:?}"))
        .clone();
    assert_eq!(
        broker, cluster.broker_addr,
        "the route names the broker's loopback address"
    );
    let default_queues = route
        .write_queues
        .get(&cluster.broker_name)
        .copied()
        .unwrap_or(0);
    assert!(
        default_queues >= QUEUES,
        "{DEFAULT_TOPIC} has {default_queues} write queues"
    );
    eprintln!(
        "interop_broker: broker {broker} registered after {registered_after:?}; sending to {topic}"
    );

    // --- Producers: messages with unique ids, each sent once, round-robin over the queues. A send
    // that fails is counted and not retried (a retry is a new send, and this test checks sends).
    const PRODUCERS: usize = 4;
    const MAX_MESSAGES: usize = 5000;
    const KILL_AFTER_ACKS: usize = 200;
    const ACKS_AFTER_RESTART: usize = 300;
    let books = Arc::new(Books::default());
    let next_id = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for _ in 0..PRODUCERS {
        let (pool, books, next_id, stop) =
            (pool.clone(), books.clone(), next_id.clone(), stop.clone());
        let (broker, topic, run) = (broker.clone(), topic.clone(), run.clone());
        producers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                if id >= MAX_MESSAGES {
                    break;
                }
                let queue = i32::try_from(id).expect("id") % QUEUES;
                let phase = books.phase.load(Ordering::Relaxed);
                let outcome =
                    classify(call(&pool, &broker, send_request(&topic, queue, &run, id)).await);
                let acked = matches!(outcome, Outcome::Acked { .. });
                books.outcomes.lock().unwrap().insert(id, (phase, outcome));
                if acked {
                    books.acked.fetch_add(1, Ordering::Relaxed);
                    if phase == AFTER_RESTART {
                        books.acked_after_restart.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    // Paces the sends while the broker is down.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    // --- Mid-run: SIGKILL the broker, restart it on the same ports and store a second later.
    let phase_start = Instant::now();
    while books.acked.load(Ordering::Relaxed) < KILL_AFTER_ACKS {
        cluster.broker.assert_running();
        assert!(
            phase_start.elapsed() < Duration::from_secs(20),
            "{KILL_AFTER_ACKS} acks not within 20 s:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection the producers use now (if a burst of SYSTEM_BUSY answers from the broker's
    // flow control just had it evicted as unhealthy, the next one).
    let broker_key = CheetahString::from(broker.as_str());
    let wanted = Instant::now();
    let before = loop {
        if let Some(conn) = pool.get(&broker_key) {
            break conn;
        }
        assert!(
            wanted.elapsed() < Duration::from_secs(10),
            "no pooled broker connection"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let first_conn = before.id();
    let stats_before = pool.stats();
    cluster.broker.kill();
    let killed_at = Instant::now();
    books.phase.store(BROKER_DOWN, Ordering::Relaxed);
    let acked_at_kill = books.acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !before.client().is_open(),
        "the client saw its connection die"
    );
    drop(before);
    cluster.broker.spawn();
    let restart = Instant::now();
    books.phase.store(AFTER_RESTART, Ordering::Relaxed);
    while books.acked_after_restart.load(Ordering::Relaxed) < ACKS_AFTER_RESTART
        && next_id.load(Ordering::Relaxed) < MAX_MESSAGES
    {
        cluster.broker.assert_running();
        assert!(
            restart.elapsed() < Duration::from_secs(30),
            "{ACKS_AFTER_RESTART} acks after the restart not within 30 s:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await.expect("producer task");
    }
    cluster.broker.assert_running();

    // --- The pool's side of the restart: the dead connection evicted, a new one made.
    let after = pool.get(&broker_key).expect("reconnected");
    assert_ne!(after.id(), first_conn, "a new connection after the restart");
    // The connector's probe (a name-server request code) works on a broker too: any answer, even
    // "not supported", proves the connection alive.
    pool.probe(&after)
        .await
        .expect("probe of the broker connection");
    drop(after);
    let stats = pool.stats();
    let evicted = (stats.evictions.closed + stats.evictions.unhealthy)
        - (stats_before.evictions.closed + stats_before.evictions.unhealthy);
    assert!(evicted >= 1, "the dead connection was evicted: {stats:?}");
    assert!(
        stats.connects.succeeded > stats_before.connects.succeeded,
        "reconnected: {stats:?}"
    );

    // --- The books.
    let outcomes = books.outcomes.lock().unwrap().clone();
    let sent = outcomes.len();
    assert_eq!(
        sent,
        next_id.load(Ordering::Relaxed).min(MAX_MESSAGES),
        "every send has an outcome"
    );
    let mut acks: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    let mut first_ack_after_restart: Option<Instant> = None;
    for (&id, (_, outcome)) in &outcomes {
        if let Outcome::Acked { queue, offset, at } = outcome {
            if let Some(other) = acks.insert((*queue, *offset), id) {
                panic!(
                    "messages {other} and {id} both acknowledged at queue {queue} offset {offset}"
                );
            }
            if *at > restart {
                first_ack_after_restart = Some(first_ack_after_restart.map_or(*at, |t| t.min(*at)));
            }
        }
    }
    let first_ack_after_restart = first_ack_after_restart.expect("an ack after the restart");

    // --- Read everything back from the broker, by pulling every queue from offset 0.
    let stored = read_back(&pool, &broker, &topic, QUEUES, Duration::from_secs(20)).await;
    let mut found: HashMap<usize, Vec<&Stored>> = HashMap::new();
    for message in &stored {
        assert_eq!(message.topic, topic);
        let body = String::from_utf8_lossy(&message.body);
        let id: usize = body
            .strip_prefix(&format!("keyed-pool interop {run} message #"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a stored message that is not this run's: {body}"));
        found.entry(id).or_default().push(message);
    }
    for (&(queue, offset), &id) in &acks {
        let copies = found.get(&id).map_or(&[][..], Vec::as_slice);
        assert_eq!(
            copies.len(),
            1,
            "acknowledged message {id} (queue {queue}, offset {offset}) found {} times on the broker",
            copies.len()
        );
        let copy = copies[0];
        assert_eq!(
            (copy.queue, copy.offset),
            (queue, offset),
            "acknowledged message {id} is stored where its ack said"
        );
        assert_eq!(copy.body, body_of(&run, id).into_bytes());
    }
    // Per phase and kind: (sends, of which stored).
    let mut summary: BTreeMap<(u8, String), (usize, usize)> = BTreeMap::new();
    for (id, (phase, outcome)) in &outcomes {
        let stored = found.get(id).map_or(0, Vec::len);
        assert!(
            stored <= 1,
            "message {id} stored {stored} times ({outcome:?})"
        );
        match outcome {
            Outcome::Acked { .. } | Outcome::NoAnswer(_) => {}
            Outcome::Refused(code, _) if *code == rmq::FLUSH_DISK_TIMEOUT => {}
            Outcome::NotSent(_) | Outcome::Refused(..) => assert_eq!(
                stored, 0,
                "message {id} was reported failed before reaching the broker's store ({outcome:?}), \
                 yet it is stored"
            ),
        }
        let entry = summary.entry((*phase, outcome.kind())).or_default();
        entry.0 += 1;
        entry.1 += stored;
    }
    for id in found.keys() {
        assert!(
            outcomes.contains_key(id),
            "message {id} stored but never sent"
        );
    }
    let failed = sent - acks.len();
    assert!(failed >= 1, "some sends failed while the broker was down");
    assert!(
        summary
            .get(&(BEFORE_KILL, "acknowledged".into()))
            .map_or(0, |s| s.0)
            >= KILL_AFTER_ACKS,
        "acknowledged before the kill, and still there after the restart"
    );

    // --- The topic is now routed: the broker registered it (at the latest when it restarted).
    let routed = Instant::now();
    let topic_route = loop {
        if let Some(route) = lookup(&pool, &namesrv, &topic).await
            && route.masters.contains_key(&cluster.broker_name)
        {
            break route;
        }
        assert!(
            routed.elapsed() < Duration::from_secs(15),
            "no route to {topic} within 15 s:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(topic_route.masters[&cluster.broker_name], broker);

    let stats = pool.stats();
    let no_answer_stored: usize = summary
        .iter()
        .filter(|((_, kind), _)| kind.starts_with("no answer"))
        .map(|(_, (_, stored))| stored)
        .sum();
    eprintln!(
        "interop_broker: {sent} sends by {PRODUCERS} producers: {} acknowledged, every one found \
         once on the broker where its ack said; {failed} reported failed, {no_answer_stored} of \
         them (no answer) stored anyway; {} messages read back",
        acks.len(),
        stored.len()
    );
    eprintln!(
        "interop_broker: broker registered {registered_after:?} after its start; SIGKILLed after \
         {acked_at_kill} acks, restarted 1 s later; first ack {:?} after the restart ({:?} after \
         the kill); pool: {} connects made, {} failed, evictions closed {} unhealthy {}; whole \
         test {:?}",
        first_ack_after_restart - restart,
        first_ack_after_restart - killed_at,
        stats.connects.succeeded,
        stats.connects.failed,
        stats.evictions.closed,
        stats.evictions.unhealthy,
        test_start.elapsed(),
    );
    for ((phase, kind), (count, stored)) in &summary {
        eprintln!(
            "interop_broker:   {:<18} {kind:<55} {count:>5} sends, {stored:>5} stored",
            PHASES[usize::from(*phase)]
        );
    }
    pool.close().await;
}
