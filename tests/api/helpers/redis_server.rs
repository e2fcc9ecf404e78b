//! A `redis-server` of the test's own, and what a broker needs to share it: the
//! `[shared_cache]` layer and the encryption key in its environment.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{ChildGuard, free_port};

/// The environment variable that holds the shared cache key in tests.
pub const CACHE_KEY_ENV: &str = "TEST_SHARED_CACHE_KEY";

/// The value of [`CACHE_KEY_ENV`] every test app's environment holds.
pub fn cache_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([42u8; 32])
}

/// A `redis-server` of the test's own on a loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Option<ChildGuard>,
    port: u16,
    /// Its working directory: replication writes an RDB file there even without `save`, and a
    /// server started later must not load another's.
    _dir: tempfile::TempDir,
    /// How the test reaches it (plain, or TLS with the test's certificates).
    client: redis::Client,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers `PING`.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// Starts one on `port` (to restart a stopped one where its clients expect it).
    pub async fn start_on(port: u16) -> Self {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        Self::start_with(port, &["--port", &port.to_string()], client).await
    }

    /// Starts one on `port` with `args` (which say where it listens), and waits until `client`
    /// gets an answer to `PING`.
    pub async fn start_with(port: u16, args: &[&str], client: redis::Client) -> Self {
        let dir = tempfile::tempdir().expect("a directory for redis-server");
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run redis-server ({error}): the shared cache tests need a real Redis; \
                     install it (`apt-get install redis-server`; .ci/run does)"
                )
            });
        let mut server = Self {
            child: Some(ChildGuard::new(child)),
            port,
            _dir: dir,
            client,
        };
        server.wait_until_ready().await;
        server
    }

    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = self.try_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            let child = self.child.as_mut().expect("started").child();
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} does not answer PING",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        self.client.get_multiplexed_async_connection().await
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection for looking at what the brokers wrote.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        self.try_connection()
            .await
            .expect("connect to redis-server")
    }

    /// Kills the server at once (no shutdown handshake), as a crash would.
    pub fn kill(&mut self) {
        self.child = None;
    }
}

/// The `[shared_cache]` layer that points a broker at `redis`.
pub fn shared_cache_config(redis: &RedisServer) -> String {
    format!(
        r#"
        [shared_cache]
        url = "{}"
        encryption_key_env = "{CACHE_KEY_ENV}"
        "#,
        redis.url()
    )
}
