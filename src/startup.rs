//! Application assembly: state, router, middleware stack, listener and graceful shutdown.
//!
//! [`Application::build`] binds the listener before anything is served, so tests and `dev` mode
//! learn the real port (bind to port 0) without sleeping. [`Application::run_until_stopped`]
//! serves until the given shutdown future completes, then turns readiness to 503, keeps accepting
//! for `server.drain_delay`, and gives in-flight requests `server.shutdown_grace` to finish.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng as _;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument as _;

use crate::api::error::{REQUEST_ID, X_REQUEST_ID};
use crate::api::{self, admin, health, oauth, tokens, users};
use crate::auth::{CallerRegistry, CallerSource};
use crate::broker::Broker;
use crate::config::{ConfigError, Settings};
use crate::idp::IdpClient;
use crate::shared_cache::{RedisCache, RedisCacheError};
use crate::users::UserTokens;

/// Longest caller-supplied `x-request-id` that is kept; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

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
#[derive(Debug, serde::Serialize)]
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
    current: ArcSwap<Snapshot>,
    reloader: Option<Reloader>,
    /// Serialises reloads so two cannot interleave their compare-and-drop.
    reloading: std::sync::Mutex<()>,
    /// User tokens (authorization-code flow).
    pub users: UserTokens,
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
    /// Builds the shared state from validated settings (inside a Tokio runtime).
    pub fn new(settings: Settings, reloader: Option<Reloader>) -> Result<Self, StartupError> {
        let idp = IdpClient::new()?;
        let users = UserTokens::new(&settings.users, settings.cache.min_remaining, idp.clone());
        let cache = settings.cache.clone();
        let broker = match &settings.shared_cache {
            Some(shared) => Broker::with_shared_cache(
                cache,
                idp,
                Arc::new(RedisCache::new(shared)?),
                shared.wait_for_peer,
            ),
            None => Broker::new(cache, idp),
        };
        Ok(Self(Arc::new(App {
            broker,
            current: ArcSwap::from_pointee(Snapshot::new(settings)),
            reloader,
            reloading: std::sync::Mutex::new(()),
            users,
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

/// The whole HTTP surface with its middleware stack.
pub fn router(state: AppState) -> Router {
    let (timeout, body_limit) = {
        let server = &state.current().settings.server;
        (server.request_timeout, server.max_body_bytes)
    };
    Router::new()
        .route(
            "/v1/tokens/{tenant}/{environment}",
            get(tokens::get_token).delete(tokens::delete_token),
        )
        .route("/v1/admin/reload", post(admin::reload))
        .route("/t/{tenant}/{environment}/oauth/token", post(oauth::token))
        .route(
            "/v1/users/{tenant}/{environment}/authorize",
            post(users::authorize),
        )
        .route(
            "/v1/users/{tenant}/{environment}/sessions",
            post(users::create_session),
        )
        .route(
            "/v1/users/handles/{handle}",
            get(users::get_user_token).delete(users::delete_user_token),
        )
        .route("/livez", get(health::livez))
        .route("/readyz", get(health::readyz))
        .route_layer(middleware::from_fn(record_route))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            timeout,
        ))
        .layer(CatchPanicLayer::custom(internal_error))
        .layer(middleware::from_fn(request_context))
        .with_state(state)
}

/// Gives each request an id (the caller's own when it is sane), a span, and the id on the answer.
async fn request_context(request: Request, next: Next) -> Response {
    let id: Arc<str> = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(format!("{:032x}", rand::rng().random::<u128>())));
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route = tracing::field::Empty,
        request_id = %id,
        caller = tracing::field::Empty,
    );
    let header = HeaderValue::from_str(&id).expect("request ids are visible ASCII");
    let mut response = REQUEST_ID
        .scope(id, next.run(request))
        .instrument(span)
        .await;
    response.headers_mut().insert(X_REQUEST_ID.clone(), header);
    response
}

/// Records the matched route (not the raw path, to keep spans low-cardinality).
async fn record_route(request: Request, next: Next) -> Response {
    if let Some(route) = request.extensions().get::<MatchedPath>() {
        tracing::Span::current().record("route", route.as_str());
    }
    next.run(request).await
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
        Ok(Self {
            state: AppState::new(settings, reloader)?,
            listener,
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
        let grace = state.current().settings.server.shutdown_grace;
        let on_hangup = tokio::spawn(reload_on_hangup(state.clone()));
        let draining = Arc::new(tokio::sync::Notify::new());
        let signal = {
            let state = state.clone();
            let draining = Arc::clone(&draining);
            async move {
                shutdown.await;
                state.start_draining();
                let delay = state.current().settings.server.drain_delay;
                if !delay.is_zero() {
                    tracing::info!(?delay, "shutting down: readiness is 503, still accepting");
                    tokio::time::sleep(delay).await;
                }
                tracing::info!(?grace, "shutting down: draining in-flight requests");
                draining.notify_one();
            }
        };
        let app = router(state);
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(signal);
        let serve = serve.into_future();
        tokio::pin!(serve);
        let _stop_reloading = AbortOnDrop(on_hangup);
        tokio::select! {
            result = &mut serve => result,
            () = draining.notified() => {
                match tokio::time::timeout(grace, serve).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("shutdown grace elapsed; closing the remaining connections");
                        Ok(())
                    }
                }
            }
        }
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
