//! Throwaway servers on loopback for the tests and the example: [`RedisServer`] and [`NginxServer`].

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
    find_binary("KEYED_POOL_REDIS_BIN", "redis-server")
}

/// The `nginx` binary: `KEYED_POOL_NGINX_BIN` if set, else the first on `PATH` or in `/usr/sbin`
/// (where Debian puts it, off a non-root `PATH`). `bash scripts/install-nginx.sh` installs it.
pub fn find_nginx() -> Option<PathBuf> {
    find_binary("KEYED_POOL_NGINX_BIN", "nginx")
}

/// `$var` if set (and a file), else `name` in the first directory of `PATH`, then `/usr/sbin`, that
/// has it. `build.rs` looks the same way (it cannot call this), so that a test is compiled as
/// runnable exactly when this finds its server.
fn find_binary(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A fresh directory under the temporary directory for one server process.
fn scratch_dir(kind: &str) -> io::Result<PathBuf> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("keyed-pool-{kind}-{}-{serial}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The last 20 lines of the file at `path` (empty if it cannot be read).
fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = log.lines().rev().take(20).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
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
        let dir = scratch_dir("redis")?;
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
        tail(&self.dir.join("redis.log"))
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

/// An `nginx` child bound to 127.0.0.1 only, on a free port, one process (`master_process off`),
/// with a config, logs and temporary files of its own in a temporary directory, answering every
/// `GET` with `200 ok\n`. Its keep-alive limits are the test's to set, to make the server close
/// connections the way real ones do. Killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct NginxServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// How long an nginx keeps a connection, and how many requests it serves on it.
#[derive(Clone, Copy, Debug)]
pub struct KeepAlive {
    /// `keepalive_timeout`: an idle connection is closed after this (whole seconds or
    /// milliseconds; nginx reads `ms`).
    pub timeout: Duration,
    /// `keepalive_requests`: the last response on a connection says `Connection: close`.
    pub requests: u32,
}

impl NginxServer {
    /// Starts a server and waits until it answers a `GET` (see [`wait_ready`](Self::wait_ready)).
    /// Tries a few ports: another process may take the free port found before nginx binds it.
    ///
    /// # Errors
    /// If it cannot be spawned, or exits or stays silent on every port tried.
    pub async fn start(binary: &Path, keep_alive: KeepAlive) -> io::Result<Self> {
        let dir = scratch_dir("nginx")?;
        let mut server = Self {
            binary: binary.to_path_buf(),
            dir,
            port: 0,
            child: None,
        };
        let mut last = io::Error::other("not started");
        for _ in 0..5 {
            server.port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            std::fs::write(server.dir.join("nginx.conf"), server.config(keep_alive))?;
            server.restart()?;
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(err) => last = err,
            }
            server.kill();
        }
        Err(last)
    }

    fn config(&self, keep_alive: KeepAlive) -> String {
        let dir = self.dir.display();
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  \
             proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n  \
             uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  \
             keepalive_timeout {}ms;\n  keepalive_requests {};\n  \
             server {{\n    listen 127.0.0.1:{};\n    \
             location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n  }}\n}}\n",
            keep_alive.timeout.as_millis(),
            keep_alive.requests,
            self.port,
        )
    }

    /// Starts the server again on its port (after [`kill`](Self::kill)); returns at once.
    ///
    /// # Errors
    /// If the process cannot be spawned.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        let child = Command::new(&self.binary)
            .arg("-p")
            .arg(&self.dir)
            .arg("-c")
            .arg(self.dir.join("nginx.conf"))
            .arg("-e")
            .arg(self.dir.join("error.log"))
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

    /// The last lines of its error log.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("error.log"))
    }

    /// Waits, at most 10 s, until the server answers `GET /` with `200` on a connection of its own
    /// (outside any pool).
    ///
    /// # Errors
    /// If the server exited or did not answer in time; the error carries its log's tail.
    pub async fn wait_ready(&mut self) -> io::Result<()> {
        use keyed_pool::Connector;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(io::Error::other(format!(
                    "nginx exited with {status}:\n{}",
                    self.log_tail()
                )));
            }
            if let Ok(mut conn) = crate::http1::Http1Connector::new()
                .connect(&self.addr())
                .await
                && let Ok(Ok(response)) =
                    tokio::time::timeout(Duration::from_secs(1), conn.get("/")).await
                && response.status == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "nginx did not answer within 10 s:\n{}",
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
