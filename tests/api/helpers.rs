//! Shared test fixtures: `spawn_app`, a token-issuing fake IdP, small request helpers, and a
//! `redis-server` of a test's own with brokers that share it.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Once};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use token_broker::app::AppState;
use token_broker::auth::KeyHash;
use token_broker::config::Settings;
use token_broker::startup::Application;
use tokio::net::TcpListener;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// The key of the `billing` caller (allowed `acme/*` and `globex/production`).
pub const BILLING_KEY: &str = "tbk_test-billing-key";
/// The admin key.
pub const ADMIN_KEY: &str = "tbk_test-admin-key";
/// The key of the `reports` caller (allowed only acme/production with one audience).
pub const REPORTS_KEY: &str = "tbk_test-reports-key";
/// Client secrets configured for the fake IdP.
pub const ACME_PRODUCTION_SECRET: &str = "acme-production-client-secret";
pub const ACME_STAGING_SECRET: &str = "acme-staging-client-secret";
pub const GLOBEX_SECRET: &str = "globex-client-secret";
/// Default audience of acme's environments.
pub const ACME_AUDIENCE: &str = "https://api.acme.example";

static TRACING: Once = Once::new();

fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter("token_broker=debug")
                .with_test_writer()
                .init();
        }
    });
}

/// The standard test configuration; `{idp}` is the fake IdP's base URL.
pub fn base_config(idp: &str) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        shutdown_grace = "2s"

        [cache]
        # DELETE forgets at once; the tests of cache.min_refetch_interval set their own.
        min_refetch_interval = "0s"

        [auth]
        admin_key_sha256 = "{admin}"

        [callers.billing]
        key_sha256 = "{billing}"
        allow = ["acme/*", "globex/production", "initech/*"]

        [callers.reports]
        key_sha256 = "{reports}"
        allow = ["acme/production/{ACME_AUDIENCE}"]

        [tenants.acme.environments.production]
        token_url = "{idp}/acme/oauth/token"
        client_id = "acme-production-id"
        client_secret = "{ACME_PRODUCTION_SECRET}"
        audience = "{ACME_AUDIENCE}"

        [tenants.acme.environments.staging]
        token_url = "{idp}/acme-staging/oauth/token"
        client_id = "acme-staging-id"
        client_secret = "{ACME_STAGING_SECRET}"
        audience = "{ACME_AUDIENCE}"
        request_format = "form"
        client_auth = "basic"

        [tenants.globex.environments.production]
        token_url = "{idp}/globex/oauth/token"
        client_id = "globex-id"
        client_secret = "{GLOBEX_SECRET}"
        "#,
        billing = KeyHash::of(BILLING_KEY).to_hex(),
        reports = KeyHash::of(REPORTS_KEY).to_hex(),
        admin = KeyHash::of(ADMIN_KEY).to_hex(),
    )
}

/// A broker running on a free port.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A client for talking to it.
    pub http: reqwest::Client,
    /// The fake IdP behind it (shared by the replicas of a fleet).
    pub idp: Arc<MockServer>,
    /// The application state, for what HTTP does not show (the shared cache's health).
    pub state: AppState,
    /// `http://127.0.0.1:PORT` of the admin listener, when `server.admin_listen` is set.
    pub admin_url: Option<String>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Starts the broker with the standard configuration (plus `extra` TOML) against a new wiremock IdP.
pub async fn spawn_app_with(extra: &str) -> TestApp {
    init_tracing();
    let idp = MockServer::start().await;
    let base = base_config(&idp.uri());
    spawn_with_layers(idp, &[&base, extra]).await
}

/// Starts the broker with the standard configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with("").await
}

/// Starts the broker with exactly `toml` (over the defaults).
pub async fn spawn_with_toml(idp: MockServer, toml: &str) -> TestApp {
    spawn_with_layers(idp, &[toml]).await
}

/// Starts the broker with TOML `layers`, each over the one before.
pub async fn spawn_with_layers(idp: MockServer, layers: &[&str]) -> TestApp {
    spawn_with_env(idp, layers, &|_| None).await
}

/// Starts the broker with TOML `layers`, reading `*_env` settings through `env`.
pub async fn spawn_with_env(
    idp: MockServer,
    layers: &[&str],
    env: &dyn Fn(&str) -> Option<String>,
) -> TestApp {
    init_tracing();
    let settings = Settings::from_toml_layers(layers, env).expect("test configuration is valid");
    start(Arc::new(idp), settings, None).await
}

/// Starts the broker from a configuration file that `POST /v1/admin/reload` re-reads.
pub async fn spawn_from_file(idp: MockServer, file: &std::path::Path) -> TestApp {
    init_tracing();
    let settings = Settings::load(Some(file)).expect("test configuration is valid");
    let file = file.to_owned();
    start(
        Arc::new(idp),
        settings,
        Some(Box::new(move || Settings::load(Some(&file)))),
    )
    .await
}

async fn start(
    idp: Arc<MockServer>,
    settings: Settings,
    reloader: Option<token_broker::app::Reloader>,
) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = Application::with_reloader(settings, listener, reloader).expect("build");
    let url = format!("http://{}", app.local_addr());
    let admin_url = app.admin_addr().map(|address| format!("http://{address}"));
    let state = app.state().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        url,
        http: reqwest::Client::new(),
        idp,
        state,
        admin_url,
        shutdown: Some(tx),
    }
}

/// Answers token requests with a new token each time: `token-1`, `token-2`, ...
#[derive(Clone)]
pub struct TokenIssuer {
    issued: Arc<AtomicU64>,
    expires_in: Value,
    delay: Duration,
}

impl TokenIssuer {
    /// Tokens that live `expires_in` seconds.
    pub fn new(expires_in: u64) -> Self {
        Self {
            issued: Arc::new(AtomicU64::new(0)),
            expires_in: json!(expires_in),
            delay: Duration::ZERO,
        }
    }

    /// Answers only after `delay`.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// How many tokens were issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }
}

impl Respond for TokenIssuer {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200)
            .set_body_json(json!({
                "access_token": format!("token-{n}"),
                "token_type": "Bearer",
                "expires_in": self.expires_in,
            }))
            .set_delay(self.delay)
    }
}

/// Mounts a [`TokenIssuer`] on `POST /{tenant_path}/oauth/token` and returns it.
pub async fn issue_tokens(idp: &MockServer, tenant_path: &str, issuer: TokenIssuer) -> TokenIssuer {
    Mock::given(method("POST"))
        .and(path(format!("/{tenant_path}/oauth/token")))
        .respond_with(issuer.clone())
        .mount(idp)
        .await;
    issuer
}

/// A parsed broker answer.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The `access_token` of a 200.
    pub fn token(&self) -> &str {
        self.body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {} {}", self.status, self.body))
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl TestApp {
    /// Sends the shutdown signal (as SIGTERM would).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// `GET /v1/tokens/{path_and_query}` with `key` (or no key).
    pub async fn get_token(&self, path_and_query: &str, key: Option<&str>) -> Answer {
        let mut request = self
            .http
            .get(format!("{}/v1/tokens/{path_and_query}", self.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        answer(request.send().await.expect("request")).await
    }

    /// `GET` as the billing caller.
    pub async fn billing(&self, path_and_query: &str) -> Answer {
        self.get_token(path_and_query, Some(BILLING_KEY)).await
    }

    /// `GET /metrics` as text.
    pub async fn scrape(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "GET /metrics");
        response.text().await.expect("body")
    }

    /// `GET {path}` (from the root) with `key` (or no key).
    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let mut request = self.http.get(format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        answer(request.send().await.expect("request")).await
    }

    /// `DELETE /v1/tokens/{path}` as billing, with an optional JSON body.
    pub async fn forget(&self, path_and_query: &str, body: Option<Value>) -> Answer {
        let mut request = self
            .http
            .delete(format!("{}/v1/tokens/{path_and_query}", self.url))
            .bearer_auth(BILLING_KEY);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        answer(request.send().await.expect("request")).await
    }
}

/// Reads a response into an [`Answer`].
pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// A TCP server that accepts connections and closes them at once, unanswered (a broken
/// connection, for reqwest); returns its URL and a counter of connections.
pub async fn resetting_server() -> (String, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, accepted)
}

/// The fields of a form-encoded body, in order.
pub fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// The IdP login page configured for user tokens in acme/production.
pub const AUTHORIZE_URL: &str = "https://login.acme.example/authorize?connection=corp";
/// The calling service's callback configured for user tokens in acme/production.
pub const REDIRECT_URI: &str = "https://app.example/callback";

/// Starts the broker with user tokens configured for acme/production.
pub async fn spawn_user_app() -> TestApp {
    spawn_app_with(&format!(
        r#"
        [tenants.acme.environments.production]
        authorize_url = "{AUTHORIZE_URL}"
        redirect_uri = "{REDIRECT_URI}"
        "#
    ))
    .await
}

impl TestApp {
    /// `POST /v1/users/{tenant_environment}/authorize` with `key` and a JSON body.
    pub async fn authorize(&self, tenant_environment: &str, key: &str, body: Value) -> Answer {
        let url = format!("{}/v1/users/{tenant_environment}/authorize", self.url);
        let request = self
            .http
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_string());
        answer(request.send().await.expect("request")).await
    }

    /// `POST /v1/users/{tenant_environment}/sessions` with `key`, `code` and `state`.
    pub async fn create_session(
        &self,
        tenant_environment: &str,
        key: &str,
        code: &str,
        state: &str,
    ) -> Answer {
        let url = format!("{}/v1/users/{tenant_environment}/sessions", self.url);
        let body = json!({ "code": code, "state": state });
        let request = self
            .http
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_string());
        answer(request.send().await.expect("request")).await
    }

    /// `GET /v1/users/handles/{handle_and_query}` with `key`.
    pub async fn user_token(&self, handle_and_query: &str, key: &str) -> Answer {
        let url = format!("{}/v1/users/handles/{handle_and_query}", self.url);
        let request = self.http.get(url).bearer_auth(key);
        answer(request.send().await.expect("request")).await
    }

    /// `DELETE /v1/users/handles/{handle}` with `key`.
    pub async fn forget_user(&self, handle: &str, key: &str) -> Answer {
        let url = format!("{}/v1/users/handles/{handle}", self.url);
        let request = self.http.delete(url).bearer_auth(key);
        answer(request.send().await.expect("request")).await
    }
}

/// The query parameters of a URL, in order.
pub fn query_fields(url: &str) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(url).expect("a URL");
    url.query_pairs().into_owned().collect()
}

/// Matches a form-encoded token request whose fields are exactly `expected`, in order.
pub struct ExactForm(pub Vec<(String, String)>);

impl ExactForm {
    /// Builds the matcher from string pairs.
    pub fn of(fields: &[(&str, &str)]) -> Self {
        Self(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }
}

impl wiremock::Match for ExactForm {
    fn matches(&self, request: &Request) -> bool {
        let form = request
            .headers
            .get("content-type")
            .is_some_and(|v| v == "application/x-www-form-urlencoded");
        form && form_fields(&request.body) == self.0
    }
}

/// A token answer with an optional refresh token.
pub fn user_token_body(
    access_token: &str,
    expires_in: u64,
    refresh_token: Option<&str>,
) -> ResponseTemplate {
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
    });
    if let Some(refresh_token) = refresh_token {
        body["refresh_token"] = json!(refresh_token);
    }
    ResponseTemplate::new(200).set_body_json(body)
}

/// The value of the metric line `name_and_labels` (as rendered: `name{a="b",...}`) in
/// Prometheus text, when present.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name_and_labels)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The address of the `listening` log line (text or JSON), as an `http://` URL.
pub fn listening_url(line: &str) -> String {
    if let Ok(json) = serde_json::from_str::<Value>(line) {
        let address = json["address"]
            .as_str()
            .expect("the listening line names the address");
        return format!("http://{address}");
    }
    let address = line
        .split("address=")
        .nth(1)
        .expect("the listening line names the address")
        .split_whitespace()
        .next()
        .expect("an address");
    format!("http://{address}")
}

/// A URL of a port nothing listens on.
pub static CLOSED_PORT_URL: LazyLock<String> = LazyLock::new(|| {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
});

/// The environment variable that holds the shared cache key in tests.
pub const CACHE_KEY_ENV: &str = "TEST_SHARED_CACHE_KEY";

/// A `redis-server` of the test's own on a loopback port, without persistence; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// Its working directory: replication writes an RDB file there even without `save`, and a
    /// server started later must not load another's.
    _dir: tempfile::TempDir,
    /// How the test reaches it (plain, or TLS with the test's certificates).
    client: redis::Client,
}

/// A free loopback port for a server a test starts itself (`redis-server`), never handed out
/// twice by this process: taken below the kernel's ephemeral range, so no port-0 listener of
/// another test can take it while its server is down for a restart.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = 20_000 + std::process::id() % 5_000;
    loop {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(20_000 + (start - 20_000 + offset) % 12_000).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
            child: Some(child),
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
            let child = self.child.as_mut().expect("started");
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
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

/// The environment of shared-cache tests: [`CACHE_KEY_ENV`] holds a key.
pub fn test_env(name: &str) -> Option<String> {
    (name == CACHE_KEY_ENV).then(|| base64::engine::general_purpose::STANDARD.encode([42u8; 32]))
}

/// Starts one broker replica on the standard configuration plus `extra`, sharing `idp` and
/// `redis`, and waits until its shared level is up and subscribed.
pub async fn spawn_replica(idp: &Arc<MockServer>, redis: &RedisServer, extra: &str) -> TestApp {
    let base = base_config(&idp.uri());
    let shared = shared_cache_config(redis);
    let app = spawn_sharing(idp, &[&base, &shared, extra]).await;
    app.wait_for_shared_cache(true).await;
    app
}

/// Starts one broker replica from TOML `layers` (read with [`test_env`]) that shares `idp` with
/// the other replicas.
pub async fn spawn_sharing(idp: &Arc<MockServer>, layers: &[&str]) -> TestApp {
    init_tracing();
    let settings =
        Settings::from_toml_layers(layers, &test_env).expect("test configuration is valid");
    start(Arc::clone(idp), settings, None).await
}

/// Starts `replicas` brokers that share one new fake IdP and `redis`.
pub async fn spawn_fleet(replicas: usize, redis: &RedisServer, extra: &str) -> Vec<TestApp> {
    let idp = Arc::new(MockServer::start().await);
    let mut fleet = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        fleet.push(spawn_replica(&idp, redis, extra).await);
    }
    fleet
}

impl TestApp {
    /// Waits (at most 10 s) until the broker reports its shared level healthy, or not.
    pub async fn wait_for_shared_cache(&self, healthy: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.state.broker.shared_cache_healthy() != Some(healthy) {
            assert!(
                Instant::now() < deadline,
                "the shared cache never became {}",
                if healthy { "healthy" } else { "unhealthy" }
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `check` until it says yes, for at most ten seconds.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
