//! Shared test fixtures: the [`TestApp`] builder that starts the broker under test, small
//! request helpers, the fake IdP's side ([`idp`]: issuing tokens, counting requests), a
//! `redis-server` of a test's own ([`redis_server`]) and a guard for the processes tests start
//! ([`child`]).

mod child;
mod idp;
mod redis_cluster;
mod redis_server;

pub use child::*;
pub use idp::*;
pub use redis_cluster::*;
pub use redis_server::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Once};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use token_broker::app::AppState;
use token_broker::auth::KeyHash;
use token_broker::clock::Clock;
use token_broker::config::{Layer, Settings};
use token_broker::startup::Application;
use tokio::net::TcpListener;
use wiremock::MockServer;

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

/// A broker running on a free port; start one with [`TestApp::init`].
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
    /// The broker's clock: a test about refresh, expiry, backoff or a pause moves it with
    /// `advance` instead of sleeping (the replicas of a fleet share one).
    pub clock: Clock,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// How a [`TestApp`] is configured: by default the standard configuration ([`base_config`])
/// against a new wiremock IdP; each `with_*` adds to it.
#[derive(Clone)]
pub struct TestAppBuilder {
    idp: Option<Arc<MockServer>>,
    base_config: bool,
    layers: Vec<String>,
    env: Vec<(String, String)>,
    file: Option<PathBuf>,
    wait_for_shared_cache: bool,
    clock: Option<Clock>,
}

impl TestApp {
    /// The standard configuration against a new wiremock IdP; add to it, then `start()`.
    pub fn init() -> TestAppBuilder {
        TestAppBuilder {
            idp: None,
            base_config: true,
            layers: Vec::new(),
            env: Vec::new(),
            file: None,
            wait_for_shared_cache: false,
            clock: None,
        }
    }

    /// The token requests its IdP has received so far.
    pub async fn idp_requests(&self) -> IdpRequests {
        idp_requests(&self.idp).await
    }
}

impl TestAppBuilder {
    /// Uses `idp` (a fleet shares one; a test may mount mocks before the start).
    pub fn with_idp(mut self, idp: impl Into<Arc<MockServer>>) -> Self {
        self.idp = Some(idp.into());
        self
    }

    /// Adds a TOML `layer` over the configuration so far.
    pub fn with_config(mut self, layer: impl Into<String>) -> Self {
        self.layers.push(layer.into());
        self
    }

    /// Starts from exactly `toml` (over the defaults), without the standard configuration.
    pub fn with_toml(mut self, toml: impl Into<String>) -> Self {
        self.base_config = false;
        self.with_config(toml)
    }

    /// User tokens for acme/production ([`AUTHORIZE_URL`], [`REDIRECT_URI`]).
    pub fn with_users(self) -> Self {
        self.with_config(format!(
            r#"
            [tenants.acme.environments.production]
            authorize_url = "{AUTHORIZE_URL}"
            redirect_uri = "{REDIRECT_URI}"
            "#
        ))
    }

    /// Shares `redis` (one server, or a cluster); `start` waits until the shared level is up
    /// and subscribed.
    pub fn with_redis(mut self, redis: &impl SharedLevel) -> Self {
        self.wait_for_shared_cache = true;
        self.with_config(redis.shared_cache_layer())
    }

    /// Sets `name` in the environment `*_env` settings read (which always holds
    /// [`CACHE_KEY_ENV`]).
    pub fn with_env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_owned(), value.into()));
        self
    }

    /// Reads time from `clock`, for replicas built one by one that must share it (by default
    /// each app, or fleet, has a [`Clock::manual`] of its own).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Reads the configuration from `file` instead, which `POST /v1/admin/reload` re-reads.
    pub fn with_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_owned());
        self
    }

    /// Starts the broker.
    pub async fn start(mut self) -> TestApp {
        let idp = match self.idp.take() {
            Some(idp) => idp,
            None => Arc::new(MockServer::start().await),
        };
        self.start_on(idp).await
    }

    /// Starts `replicas` brokers that share one IdP (and Redis, with [`Self::with_redis`]).
    pub async fn start_fleet(mut self, replicas: usize) -> Vec<TestApp> {
        let idp = match self.idp.take() {
            Some(idp) => idp,
            None => Arc::new(MockServer::start().await),
        };
        self.clock.get_or_insert_with(Clock::manual);
        let mut fleet = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            fleet.push(self.clone().start_on(Arc::clone(&idp)).await);
        }
        fleet
    }

    async fn start_on(self, idp: Arc<MockServer>) -> TestApp {
        init_tracing();
        let (settings, reloader) = match &self.file {
            Some(file) => {
                // As `Settings::load`, with the test's environment for `*_env` settings.
                let (file, env) = (file.clone(), self.env.clone());
                let load = move || {
                    let env = |name: &str| test_env(&env, name);
                    Settings::from_layers(&[Layer::File(&file)], false, &env)
                };
                let settings = load().expect("test configuration is valid");
                let reloader: token_broker::app::Reloader = Box::new(load);
                (settings, Some(reloader))
            }
            None => {
                let base = self.base_config.then(|| base_config(&idp.uri()));
                let layers: Vec<&str> = base
                    .iter()
                    .chain(&self.layers)
                    .map(String::as_str)
                    .collect();
                let env = |name: &str| test_env(&self.env, name);
                let settings =
                    Settings::from_toml_layers(&layers, &env).expect("test configuration is valid");
                (settings, None)
            }
        };
        let clock = self.clock.clone().unwrap_or_else(Clock::manual);
        let app = start(idp, settings, reloader, clock).await;
        if self.wait_for_shared_cache {
            app.wait_for_shared_cache(true).await;
        }
        app
    }
}

/// The value of `name` in a test app's environment: `set`, and [`CACHE_KEY_ENV`].
fn test_env(set: &[(String, String)], name: &str) -> Option<String> {
    match set.iter().find(|(set, _)| set == name) {
        Some((_, value)) => Some(value.clone()),
        None => (name == CACHE_KEY_ENV).then(cache_key),
    }
}

/// A shared level a test app can be pointed at: one `redis-server`, or a cluster.
pub trait SharedLevel {
    /// The `[shared_cache]` layer that points a broker at it.
    fn shared_cache_layer(&self) -> String;
}

impl SharedLevel for RedisServer {
    fn shared_cache_layer(&self) -> String {
        shared_cache_config(self)
    }
}

/// The one place a test builds an [`Application`].
async fn start(
    idp: Arc<MockServer>,
    settings: Settings,
    reloader: Option<token_broker::app::Reloader>,
    clock: Clock,
) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = Application::with_clock(settings, listener, reloader, clock.clone()).expect("build");
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
        clock,
        shutdown: Some(tx),
    }
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

    /// `POST /v1/admin/reload` with the admin key.
    pub async fn reload(&self) -> Answer {
        let request = self
            .http
            .post(format!("{}/v1/admin/reload", self.url))
            .bearer_auth(ADMIN_KEY);
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

    /// A session for billing in acme/production whose code exchange the IdP answers with
    /// `answer` (once); its handle.
    pub async fn user_session(&self, answer: wiremock::ResponseTemplate) -> String {
        let started = self
            .authorize("acme/production", BILLING_KEY, json!({}))
            .await;
        let state = started.body["state"].as_str().unwrap();
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::body_string_contains(
                "grant_type=authorization_code",
            ))
            .respond_with(answer)
            .up_to_n_times(1)
            .mount(&self.idp)
            .await;
        let created = self
            .create_session("acme/production", BILLING_KEY, "code", state)
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
        created.body["handle"].as_str().unwrap().to_owned()
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
pub static CLOSED_PORT_URL: LazyLock<String> =
    LazyLock::new(|| format!("http://127.0.0.1:{}", free_port()));

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

/// Token requests for acme/production on every replica of a fleet, until [`Load::finish`]: the
/// cached key, and a new key every `new_key_every`-th request, `pause` apart.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    /// Starts the requests on each of `fleet`.
    pub fn start(fleet: &[TestApp], new_key_every: u64, pause: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = fleet
            .iter()
            .enumerate()
            .map(|(n, replica)| {
                let (url, http) = (replica.url.clone(), replica.http.clone());
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let (mut sent, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::SeqCst) {
                        sent += 1;
                        let scope = if sent % new_key_every == 0 {
                            format!("?scope=load-{n}-{sent}")
                        } else {
                            String::new()
                        };
                        let response = http
                            .get(format!("{url}/v1/tokens/acme/production{scope}"))
                            .bearer_auth(BILLING_KEY)
                            .send()
                            .await
                            .expect("the replica answers");
                        if response.status() != 200 {
                            failed.push(response.text().await.unwrap_or_default());
                        }
                        tokio::time::sleep(pause).await;
                    }
                    (sent, failed)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the requests and asserts that more than ten were sent per replica and none failed.
    pub async fn finish(self, during: &str) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let (sent, failed) = task.await.expect("the load task ends");
            assert!(sent > 10, "the load ran ({sent} requests)");
            assert_eq!(failed, Vec::<String>::new(), "no request failed {during}");
        }
    }
}
