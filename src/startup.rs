//! Serving: the middleware stack around the routes, the listener (HTTP or HTTPS) and graceful
//! shutdown.
//!
//! [`Application::build`] binds the listener before anything is served, so tests and `dev` mode
//! learn the real port (bind to port 0) without sleeping. [`Application::run_until_stopped`]
//! serves (HTTP, or HTTPS with `server.tls`) until the given shutdown future completes, then
//! turns readiness to 503, keeps accepting for `server.drain_delay`, and gives in-flight requests
//! `server.shutdown_grace` to finish.
//!
//! The routes come from [`crate::api::routes`] and the state from [`crate::app`]; this module adds
//! the middleware stack. Every request gets an id, a span (method, matched route, request id,
//! caller), a count in `token_broker_http_requests_total` and one access-log line.

mod request_context;
mod request_timeout;
mod routes;
mod serve;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceBuilder;

use crate::api::{self, Surface};
use crate::app::{AppError, AppState, ReloadHook, ReloadTrigger, Reloader, rotate_when_due};
use crate::clock::Clock;
use crate::config::Settings;
use crate::telemetry::metrics::Metrics;

use request_context::RequestContextLayer;
use request_timeout::RequestTimeoutLayer;
pub use routes::{Routes, TokenHandler};
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
    /// `server.tls` names files that do not make a usable certificate and key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The application state could not be built (IdP HTTP client, shared cache).
    #[error(transparent)]
    App(#[from] AppError),
}

/// The routes of one listener (see [`Surface`]) with the middleware stack; on a listener for
/// callers, `GET /v1/tokens/{tenant}/{environment}` is recognised before the router
/// ([`routes`]).
pub fn router(state: AppState, surface: Surface) -> Routes<impl TokenHandler> {
    let (timeout, body_limit) = {
        let server = &state.current().settings.server;
        (server.request_timeout, server.max_body_bytes)
    };
    let (router, document) = api::routes_for(surface).split_for_parts();
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
        .layer(RequestContextLayer::new(Arc::clone(&http_metrics)))
        .layer(RequestTimeoutLayer::new(timeout))
        .layer(DefaultBodyLimit::max(body_limit));
    let serves_tokens = document.paths.paths.contains_key(api::tokens::TOKENS_ROUTE);
    let router = router
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(layers)
        .with_state(state.clone());
    let handler = routes::token_handler();
    if serves_tokens {
        Routes::with_tokens(router, state, handler, http_metrics, timeout)
    } else {
        Routes::router_only(router)
    }
}

/// A built application: state plus a bound listener, ready to serve.
pub struct Application {
    state: AppState,
    listener: TcpListener,
    /// The listener of `server.admin_listen`, when set.
    admin_listener: Option<TcpListener>,
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
        Self::with_clock(settings, listener, reloader, Clock::system())
    }

    /// Like [`Application::with_reloader`], reading time from `clock`: tests pass a
    /// [`Clock::manual`] and move it instead of waiting.
    pub fn with_clock(
        settings: Settings,
        listener: TcpListener,
        reloader: Option<Reloader>,
        clock: Clock,
    ) -> Result<Self, StartupError> {
        let tls = settings
            .server
            .tls
            .as_ref()
            .map(tls::acceptor)
            .transpose()?;
        let admin_listener = settings
            .server
            .admin_listen
            .as_deref()
            .map(bind_now)
            .transpose()?;
        let state = AppState::new(settings, reloader, clock)?;
        if let Some((_, certificate)) = &tls {
            state.on_reload(reload_certificate(Arc::clone(certificate)));
        }
        Ok(Self {
            state,
            listener,
            admin_listener,
            tls: tls.map(|(acceptor, _)| acceptor),
        })
    }

    /// The address actually bound (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// The address of the admin listener, when `server.admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
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
        let (grace, max_header_bytes, max_connections) = {
            let server = &state.current().settings.server;
            (
                server.shutdown_grace,
                server.max_header_bytes,
                server.max_connections,
            )
        };
        let _stop_reloading = AbortOnDrop(tokio::spawn(reload_on_hangup(state.clone())));
        let _stop_watching = AbortOnDrop(tokio::spawn(reload_on_file_change(state.clone())));
        let _stop_rotating = AbortOnDrop(tokio::spawn(rotate_when_due(state.clone())));
        let _stop_upkeep = AbortOnDrop(tokio::spawn(metrics_upkeep(state.metrics.clone())));
        let audit_interval = state.current().settings.telemetry.audit_interval;
        let _stop_audit = AbortOnDrop(tokio::spawn(audit_summaries(state.clone(), audit_interval)));
        if self.tls.is_some() {
            tracing::info!("serving HTTPS (server.tls)");
        }
        let settings = |tls: Option<TlsAcceptor>| serve::ConnectionSettings {
            max_header_bytes,
            tls,
            max_connections,
        };
        // Both listeners stop accepting together, after the drain delay.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop_accepting = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let admin = self.admin_listener.map(|listener| {
            let (state, settings) = (state.clone(), settings(self.tls.clone()));
            let stopped = stop_accepting(stopped.clone());
            tokio::spawn(async move {
                let app = router(state, Surface::Admin);
                serve::accept_until(listener, app, settings, stopped).await
            })
        });
        let surface = if admin.is_some() {
            Surface::Main
        } else {
            Surface::All
        };
        let signal = {
            let state = state.clone();
            tokio::spawn(async move {
                shutdown.await;
                state.start_draining();
                let delay = state.current().settings.server.drain_delay;
                if !delay.is_zero() {
                    tracing::info!(?delay, "shutting down: readiness is 503, still accepting");
                    tokio::time::sleep(delay).await;
                }
                let _ = stop.send(true);
            })
        };
        let connections = serve::accept_until(
            self.listener,
            router(state.clone(), surface),
            settings(self.tls),
            stop_accepting(stopped),
        )
        .await;
        signal.abort();
        let admin_connections = match admin {
            Some(admin) => admin.await.ok(),
            None => None,
        };
        tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
        let drained = async {
            connections.shutdown().await;
            if let Some(admin) = admin_connections {
                admin.shutdown().await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("shutdown grace elapsed; closing the remaining connections");
        }
        // The hand-outs counted since the last summary, so that none is missing from the trail.
        state.audit.flush();
        Ok(())
    }
}

/// Writes the audit trail's summary lines every `interval`, on a blocking thread: a summary
/// is a line per (caller, token) counter that moved, up to `telemetry.audit_max_counters`, and
/// writing them on a runtime worker would hold up the requests queued behind it.
async fn audit_summaries(state: AppState, interval: std::time::Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let state = state.clone();
        // A summary that panicked lost only its own lines; the next one runs as usual.
        let _ = tokio::task::spawn_blocking(move || state.audit.flush()).await;
    }
}

/// Binds `address` at once (the admin listener, bound while the application is built).
fn bind_now(address: &str) -> Result<TcpListener, StartupError> {
    let bind = |address: &str| {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    };
    bind(address).map_err(|source| StartupError::Bind {
        address: address.to_owned(),
        source,
    })
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
            let reloading = state.clone();
            match tokio::task::spawn_blocking(move || reloading.reload(ReloadTrigger::Signal)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(%error, "reload refused; the previous configuration keeps serving");
                }
                Err(error) => tracing::error!(%error, "reload failed unexpectedly"),
            }
        }
    }
    #[cfg(not(unix))]
    drop(state);
}

/// The reload step that replaces the server certificate with the files the new settings name
/// (TLS turned on or off needs a restart, which the reload report says).
fn reload_certificate(certificate: Arc<tls::ServerCertificate>) -> ReloadHook {
    Box::new(move |settings: &Settings| {
        let Some(files) = &settings.server.tls else {
            return Ok(Box::new(|| {}) as Box<dyn FnOnce() + Send>);
        };
        let key = certificate.read(files).map_err(|error| error.to_string())?;
        let certificate = Arc::clone(&certificate);
        Ok(Box::new(move || {
            certificate.install(key);
            tracing::info!("server certificate replaced; new connections get it");
        }) as Box<dyn FnOnce() + Send>)
    })
}

/// Reloads as `SIGHUP` does when the content of a file the configuration names changes (the
/// configuration file, secrets, keys, certificates: a Kubernetes Secret changes through a
/// symlink, so content is compared, not times), checked every `server.watch_interval` on the
/// broker's clock. A change that cannot be applied (a file caught half-written, an invalid
/// value) changes nothing, is logged once and is tried again only when the files change again.
async fn reload_on_file_change(state: AppState) {
    if !state.is_reloadable() {
        return;
    }
    let mut applied = fingerprint(&state.current().settings.watched_files).await;
    let mut refused = None;
    // The snapshot last seen: a reload by signal or admin call (which read the files) is not
    // taken for a change to reload again.
    let mut seen = Arc::clone(&state.current());
    loop {
        let interval = state.current().settings.server.watch_interval;
        if interval.is_zero() {
            // Off: look again later, as a reload may turn it on.
            state.clock.sleep(WATCH_OFF_RECHECK).await;
            continue;
        }
        state.clock.sleep(interval).await;
        let current = state.current();
        let files = current.settings.watched_files.clone();
        let reloaded_elsewhere = !Arc::ptr_eq(&current, &seen);
        seen = Arc::clone(&current);
        drop(current);
        let now = fingerprint(&files).await;
        if reloaded_elsewhere {
            applied = now;
            refused = None;
            continue;
        }
        if now == applied || Some(now) == refused {
            continue;
        }
        let reloading = state.clone();
        match tokio::task::spawn_blocking(move || reloading.reload(ReloadTrigger::File)).await {
            Ok(Ok(_)) => {
                tracing::info!("a file of the configuration changed: reloaded");
                let current = state.current();
                seen = Arc::clone(&current);
                // What this reload read, unless it names other files now: a write that lands
                // after it is then still a change.
                applied = if current.settings.watched_files == files {
                    now
                } else {
                    let files = current.settings.watched_files.clone();
                    drop(current);
                    fingerprint(&files).await
                };
                refused = None;
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "a file of the configuration changed, but the reload was refused; the previous configuration keeps serving");
                refused = Some(now);
            }
            Err(error) => tracing::error!(%error, "reload failed unexpectedly"),
        }
    }
}

/// While `server.watch_interval` is 0, how often the watcher looks whether a reload set it.
const WATCH_OFF_RECHECK: Duration = Duration::from_secs(10);

/// A digest of the content of `files` (a missing or unreadable one counts as such).
async fn fingerprint(files: &[std::path::PathBuf]) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    for file in files {
        let path = file.as_os_str().as_encoded_bytes();
        hash.update((path.len() as u64).to_be_bytes());
        hash.update(path);
        match tokio::fs::read(file).await {
            Ok(content) => {
                hash.update([1]);
                hash.update((content.len() as u64).to_be_bytes());
                hash.update(&content);
            }
            Err(_) => hash.update([0]),
        }
    }
    hash.finalize().into()
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
