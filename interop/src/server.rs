//! [`RedisServer`]: a throwaway `redis-server` on loopback, for the test and the example.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyed_pool::CheetahString;
use redis::AsyncConnectionConfig;

/// The `redis-server` binary: `KEYED_POOL_REDIS_BIN` if set, else the first on `PATH`.
/// `bash scripts/install-redis.sh` installs it from Debian's packages.
pub fn find_redis_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("KEYED_POOL_REDIS_BIN") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
}

/// A `redis-server` child bound to 127.0.0.1 only, on a free port, in a temporary directory of its
/// own, without persistence (`--save '' --appendonly no`). Killed, and its directory removed, on
/// drop.
#[derive(Debug)]
pub struct RedisServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server and waits until it answers (see [`wait_ready`](Self::wait_ready)). Tries a
    /// few ports: another process may take the free port found before the server binds it.
    ///
    /// # Errors
    /// If it cannot be spawned, or exits or stays silent on every port tried.
    pub async fn start(binary: &Path) -> io::Result<Self> {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("keyed-pool-redis-{}-{serial}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            binary: binary.to_path_buf(),
            dir,
            port: 0,
            child: None,
        };
        let mut last = io::Error::other("not started");
        for _ in 0..5 {
            server.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            server.restart()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(err) => last = err,
            }
            server.kill();
        }
        Err(last)
    }

    /// Starts the server again on its port (after [`kill`](Self::kill)); returns at once.
    ///
    /// # Errors
    /// If the process cannot be spawned.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> CheetahString {
        format!("127.0.0.1:{}", self.port).into()
    }

    /// Kills the server with SIGKILL (no goodbye to its clients) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<_> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits, at most 10 s, until the server answers PING on a connection of its own (outside any
    /// pool).
    ///
    /// # Errors
    /// If the server exited or did not answer in time; the error carries its log's tail.
    pub async fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client =
            redis::Client::open(format!("redis://{}/", self.addr())).map_err(io::Error::other)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(1));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "redis-server exited with {status}:\n{}",
                    self.log_tail()
                )));
            }
            if let Ok(mut conn) = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                && redis::cmd("PING")
                    .query_async::<()>(&mut conn)
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "redis-server did not answer within 10 s:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
