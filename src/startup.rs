//! Application assembly: state, router, middleware stack, listener and graceful shutdown.
//!
//! [`Application::build`] binds the listener before anything is served, so tests and `dev` mode
//! learn the real port (bind to port 0) without sleeping. [`Application::run_until_stopped`]
//! serves (HTTP, or HTTPS with `server.tls`) until the given shutdown future completes, then
//! turns readiness to 503, keeps accepting for `server.drain_delay`, and gives in-flight requests
//! `server.shutdown_grace` to finish.
//!
//! [`routes`] is the one list of routes: the router and the OpenAPI document are both built from
//! it. Every request gets an id, a span (method, matched route, request id, caller), a count in
//! `token_broker_http_requests_total` and one access-log line.

mod context;
mod serve;
mod tls;

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::{self, admin, health, metrics, oauth, openapi, tokens, users};
use crate::auth::{CallerRegistry, CallerSource};
use crate::broker::Broker;
use crate::config::{ConfigError, Settings};
use crate::idp::IdpClient;
use crate::shared_cache::{RedisCache, RedisCacheError};
use crate::telemetry::metrics::Metrics;
use crate::users::UserTokens;

use context::RequestContextLayer;
pub use tls::TlsError;

/// How often recorded histogram samples are moved into their buckets.
const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The configured address.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP client for IdPs could not be built (TLS roots, for instance).
    #[error("cannot build the IdP HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// `server.tls` names files that do not make a usable certificate and key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The shared cache could not be set up.
    #[error(transparent)]
    SharedCache(#[from] RedisCacheError),
}

/// Reads the configuration again, for `POST /v1/admin/reload` and `SIGHUP`.
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// The configuration in force: settings and the callers built from them, swapped whole on reload.
pub struct Snapshot {
    /// The validated settings.
    pub settings: Settings,
    /// Caller keys and allow rules.
    pub callers: Arc<CallerRegistry>,
}

impl Snapshot {
    fn new(settings: Settings) -> Self {
        let callers = Arc::new(CallerRegistry::from_settings(&settings));
        Self { settings, callers }
    }
}

/// What a reload changed.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Tenants now configured.
    pub tenants: usize,
    /// Environments now configured.
    pub environments: usize,
    /// Callers now configured.
    pub callers: usize,
    /// `tenant/environment` whose cached tokens were dropped (identity changed or removed).
    pub dropped: Vec<String>,
}

/// Why a reload was refused; the old configuration keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The broker was started from a configuration that cannot be read again (dev mode).
    #[error(
        "this broker's configuration was not loaded from files, so there is nothing to re-read"
    )]
    NotReloadable,
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Everything the handlers share.
pub struct App {
    /// Tokens from cache or IdP.
    pub broker: Broker,
    /// This application's metrics.
    pub metrics: Metrics,
    /// User tokens (authorization-code flow).
    pub users: UserTokens,
    current: ArcSwap<Snapshot>,
    reloader: Option<Reloader>,
    /// Serialises reloads so two cannot interleave their compare-and-drop.
    reloading: std::sync::Mutex<()>,
    ready: AtomicBool,
}

/// The router state: a cheap handle on [`App`].
#[derive(Clone)]
pub struct AppState(Arc<App>);

impl Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

impl CallerSource for AppState {
    fn caller_registry(&self) -> Arc<CallerRegistry> {
        Arc::clone(&self.current.load().callers)
    }
}

impl AppState {
    /// Builds the shared state from validated settings.
    pub fn new(settings: Settings, reloader: Option<Reloader>) -> Result<Self, StartupError> {
        let idp = IdpClient::new()?;
        let metrics = Metrics::new();
        register_environments(&metrics, &settings);
        let users = UserTokens::new(&settings.users, settings.cache.min_remaining, idp.clone());
        let cache = settings.cache.clone();
        let broker = match &settings.shared_cache {
            Some(shared) => Broker::with_shared_cache(
                cache,
                idp,
                metrics.clone(),
                Arc::new(RedisCache::new(shared)?),
                shared.wait_for_peer,
            ),
            None => Broker::new(cache, idp, metrics.clone()),
        };
        Ok(Self(Arc::new(App {
            broker,
            metrics,
            users,
            current: ArcSwap::from_pointee(Snapshot::new(settings)),
            reloader,
            reloading: std::sync::Mutex::new(()),
            ready: AtomicBool::new(true),
        })))
    }

    /// The configuration in force now (cheap; hold it only for the request).
    pub fn current(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn start_draining(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Re-reads the configuration; keeps cached tokens of environments whose identity is
    /// unchanged (even with a rotated secret) and drops the others. An invalid configuration is
    /// refused and the old one keeps serving.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let reloader = self.reloader.as_ref().ok_or(ReloadError::NotReloadable)?;
        let _serialised = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let settings = reloader()?;
        let old = self.current.load_full();
        if settings.server.listen != old.settings.server.listen {
            tracing::warn!("server.listen changed; it takes effect only after a restart");
        }
        let dropped: Vec<(String, String)> = old
            .settings
            .environments()
            .filter(|(tenant, environment, before)| {
                settings
                    .environment(tenant, environment)
                    .is_none_or(|after| !after.same_identity(before))
            })
            .map(|(t, e, _)| (t.to_owned(), e.to_owned()))
            .collect();
        let report = ReloadReport {
            tenants: settings.tenants.len(),
            environments: settings.environments().count(),
            callers: settings.callers.len(),
            dropped: dropped.iter().map(|(t, e)| format!("{t}/{e}")).collect(),
        };
        register_environments(&self.metrics, &settings);
        self.current.store(Arc::new(Snapshot::new(settings)));
        self.broker.forget_environments(dropped);
        self.broker.forget_rejections();
        tracing::info!(
            tenants = report.tenants,
            environments = report.environments,
            callers = report.callers,
            dropped = ?report.dropped,
            "configuration reloaded"
        );
        Ok(report)
    }
}

/// Shows every configured environment in the metrics from the start, at zero.
fn register_environments(metrics: &Metrics, settings: &Settings) {
    for (tenant, environment, _) in settings.environments() {
        metrics.register_environment(tenant, environment);
    }
}

/// Every route with its OpenAPI description. The router and `/openapi.json` are both built from
/// this one list, so neither can miss a route.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(token_routes())
        .merge(oauth_facade_routes())
        .merge(user_routes())
        .merge(operation_routes())
        .merge(admin_routes())
}

/// The caller API of API.md §1.
fn token_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tokens::get_token, tokens::delete_token))
}

/// The OAuth2-compatible facade of API.md §1, `POST /t/{tenant}/{environment}/oauth/token`, kept
/// apart from the `/v1` API because it speaks RFC 6749 and authenticates callers its own way. Its
/// handler is registered here, with `.routes(routes!(...))` like the others.
fn oauth_facade_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(oauth::token))
}

/// User tokens through the authorization-code flow.
fn user_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(users::authorize))
        .routes(routes!(users::create_session))
        .routes(routes!(users::get_user_token, users::delete_user_token))
}

/// Probes, metrics and the OpenAPI document (API.md §3).
fn operation_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::livez))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::openapi_json))
}

/// The admin API behind the admin key (API.md §3).
fn admin_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(admin::tenants))
        .routes(routes!(admin::cache))
        .routes(routes!(admin::reload))
}

/// The whole HTTP surface with its middleware stack.
pub fn router(state: AppState) -> Router {
    let (timeout, body_limit) = {
        let server = &state.current().settings.server;
        (server.request_timeout, server.max_body_bytes)
    };
    let (router, document) = routes().split_for_parts();
    let http_metrics = Arc::new(
        state
            .metrics
            .http(document.paths.paths.keys().map(String::as_str)),
    );
    // `Router::layer` wraps each route after matching, so the outermost layer sees the matched
    // route and the final status, including timeouts and panics answered by the inner layers.
    // The layers are stacked first and given to the router once: each `Router::layer` call boxes
    // every route again, which costs a clone, a box and a boxed future per request and layer.
    let layers = ServiceBuilder::new()
        .layer(RequestContextLayer::new(http_metrics))
        .layer(CatchPanicLayer::custom(internal_error))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(DefaultBodyLimit::max(body_limit));
    router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(layers)
        .with_state(state)
}

fn internal_error(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(serde_json::json!({
            "error": "internal_error",
            "error_description": "internal error",
        })),
    )
        .into_response()
}

/// A built application: state plus a bound listener, ready to serve.
pub struct Application {
    state: AppState,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Application {
    /// Builds the state and binds `server.listen`; `reloader` re-reads the configuration.
    pub async fn build(
        settings: Settings,
        reloader: Option<Reloader>,
    ) -> Result<Self, StartupError> {
        let address = settings.server.listen.clone();
        let listener = TcpListener::bind(&address)
            .await
            .map_err(|source| StartupError::Bind { address, source })?;
        Self::with_reloader(settings, listener, reloader)
    }

    /// Builds the state around a listener the caller already bound.
    pub fn with_listener(settings: Settings, listener: TcpListener) -> Result<Self, StartupError> {
        Self::with_reloader(settings, listener, None)
    }

    /// Like [`Application::with_listener`], with a way to re-read the configuration on reload.
    pub fn with_reloader(
        settings: Settings,
        listener: TcpListener,
        reloader: Option<Reloader>,
    ) -> Result<Self, StartupError> {
        let tls = settings
            .server
            .tls
            .as_ref()
            .map(tls::acceptor)
            .transpose()?;
        Ok(Self {
            state: AppState::new(settings, reloader)?,
            listener,
            tls,
        })
    }

    /// The address actually bound (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// The shared state, for callers that need the broker directly.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then drains for at most `server.shutdown_grace`.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let (grace, max_header_bytes) = {
            let server = &state.current().settings.server;
            (server.shutdown_grace, server.max_header_bytes)
        };
        let _stop_reloading = AbortOnDrop(tokio::spawn(reload_on_hangup(state.clone())));
        let _stop_upkeep = AbortOnDrop(tokio::spawn(metrics_upkeep(state.metrics.clone())));
        if self.tls.is_some() {
            tracing::info!("serving HTTPS (server.tls)");
        }
        let settings = serve::ConnectionSettings {
            max_header_bytes,
            tls: self.tls,
        };
        let stop_accepting = {
            let state = state.clone();
            async move {
                shutdown.await;
                state.start_draining();
                let delay = state.current().settings.server.drain_delay;
                if !delay.is_zero() {
                    tracing::info!(?delay, "shutting down: readiness is 503, still accepting");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        let connections = serve::accept_until(
            self.listener,
            router(state.clone()),
            settings,
            stop_accepting,
        )
        .await;
        tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
        if tokio::time::timeout(grace, connections.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace elapsed; closing the remaining connections");
        }
        Ok(())
    }
}

/// Moves histogram samples into buckets every few seconds, so memory stays bounded between
/// scrapes.
async fn metrics_upkeep(metrics: Metrics) {
    let mut ticks = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    loop {
        ticks.tick().await;
        metrics.run_upkeep();
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reloads the configuration on every SIGHUP.
async fn reload_on_hangup(state: AppState) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reload through the admin API");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if let Err(error) = state.reload() {
                tracing::error!(%error, "reload refused; the previous configuration keeps serving");
            }
        }
    }
    #[cfg(not(unix))]
    drop(state);
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
