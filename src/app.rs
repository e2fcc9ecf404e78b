//! The application state every handler shares: the components, the configuration in force and
//! how to reload it.
//!
//! [`AppState`] is a cheap handle on one [`App`]: the broker, the user-token service and the
//! metrics, built once from [`Settings`], and a [`Snapshot`] of the configuration (settings and
//! the caller registry built from them) that a reload swaps whole. This module imports the
//! components and never the API that uses it, as crates.io keeps its `App` apart from its
//! controllers; routes live in `api` and the server in `startup`.

mod rotation;

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::auth::{CallerRegistry, CallerSource};
use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::{ConfigError, Settings};
use crate::idp::{EnvironmentSettings, IdpClient};
use crate::shared_cache::{RedisCache, RedisCacheError};
use crate::telemetry::audit::AuditTrail;
use crate::telemetry::metrics::Metrics;
use crate::user_tokens::{SharedSessions, UserTokens};

pub use rotation::rotate_when_due;

/// Why the application state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The HTTP client for IdPs could not be built (TLS roots, for instance).
    #[error("cannot build the IdP HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// The shared cache could not be set up.
    #[error(transparent)]
    SharedCache(#[from] RedisCacheError),
}

/// Reads the configuration again, for `POST /v1/admin/reload` and `SIGHUP`.
pub type Reloader = Box<dyn Fn() -> Result<Settings, ConfigError> + Send + Sync>;

/// A step of every reload outside the components (the server certificate): checks what the new
/// settings need and returns what puts it in force, run only once every step is ready; an error
/// refuses the reload.
pub type ReloadHook =
    Box<dyn Fn(&Settings) -> Result<Box<dyn FnOnce() + Send>, String> + Send + Sync>;

/// The configuration in force: settings and the callers built from them, swapped whole on reload.
pub struct Snapshot {
    /// The validated settings.
    pub settings: Settings,
    /// Caller keys and allow rules.
    pub callers: Arc<CallerRegistry>,
}

impl Snapshot {
    fn new(
        settings: Settings,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
        clock: &Clock,
    ) -> Self {
        let callers = Arc::new(CallerRegistry::from_settings(
            &settings.auth,
            &settings.callers,
            metrics,
            previous.map(|snapshot| &*snapshot.callers),
            clock,
        ));
        Self { settings, callers }
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadTrigger {
    /// A file the configuration names changed (`server.watch_interval`).
    File,
    /// `SIGHUP`.
    Signal,
    /// `POST /v1/admin/reload`.
    Admin,
}

impl ReloadTrigger {
    /// `file`, `signal` or `admin`, as the `trigger` label says.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Signal => "signal",
            Self::Admin => "admin",
        }
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
    /// Settings that changed but take effect only after a restart (for example
    /// `server.listen`); the running broker keeps the old values.
    pub restart_required: Vec<String>,
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
    /// The new configuration is valid but could not be put in force (a server certificate
    /// and key that do not match, shared-cache credentials the client refuses).
    #[error("the configuration cannot be applied: {0}; the old configuration keeps serving")]
    Apply(String),
}

/// Everything the handlers share.
pub struct App {
    /// Tokens from cache or IdP.
    pub broker: Broker,
    /// This application's metrics.
    pub metrics: Metrics,
    /// User tokens (authorization-code flow).
    pub user_tokens: UserTokens,
    /// Who was handed which token.
    pub audit: AuditTrail,
    /// The clock every component reads.
    pub clock: Clock,
    current: ArcSwap<Snapshot>,
    /// The configuration the process started with: what settings read only at start still hold.
    started: Arc<Snapshot>,
    reloader: Option<Reloader>,
    /// The steps every reload runs besides the components'.
    reload_hooks: std::sync::Mutex<Vec<ReloadHook>>,
    /// The shared level's client, to which a reload gives new credentials.
    shared_cache: Option<RedisCache>,
    /// Serialises reloads so two cannot interleave their compare-and-drop.
    reloading: std::sync::Mutex<()>,
    /// Reloads so far: the generation the next changed environments get.
    reloads: AtomicU64,
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
    /// Builds the shared state from validated settings, reading time from `clock`.
    pub fn new(
        settings: Settings,
        reloader: Option<Reloader>,
        clock: Clock,
    ) -> Result<Self, AppError> {
        let idp = IdpClient::new(clock.clone())?;
        let metrics = Metrics::new();
        register_environments(&metrics, &settings);
        let cache = settings.cache.clone();
        let min_remaining = cache.min_remaining;
        let mut shared_cache = None;
        let (broker, sessions) = match &settings.shared_cache {
            Some(shared) => {
                // One Redis client for tokens and user sessions: one probe, one health.
                let redis = RedisCache::new(shared)?;
                shared_cache = Some(redis.clone());
                let broker = Broker::with_shared_cache(
                    cache,
                    idp.clone(),
                    metrics.clone(),
                    Arc::new(redis.clone()),
                    shared.wait_for_peer,
                    clock.clone(),
                );
                (broker, Some(Arc::new(redis) as Arc<dyn SharedSessions>))
            }
            None => (
                Broker::new(cache, idp.clone(), metrics.clone(), clock.clone()),
                None,
            ),
        };
        let user_tokens = UserTokens::new(
            &settings.users,
            min_remaining,
            settings.cache.min_refetch_interval,
            idp,
            broker.clone(),
            metrics.clone(),
            sessions,
        );
        let audit = AuditTrail::new(settings.telemetry.audit_max_counters, clock.clone());
        let snapshot = Arc::new(Snapshot::new(settings, &metrics, None, &clock));
        Ok(Self(Arc::new(App {
            broker,
            metrics,
            user_tokens,
            audit,
            clock,
            current: ArcSwap::new(Arc::clone(&snapshot)),
            started: snapshot,
            reloader,
            reload_hooks: std::sync::Mutex::new(Vec::new()),
            shared_cache,
            reloading: std::sync::Mutex::new(()),
            reloads: AtomicU64::new(0),
            ready: AtomicBool::new(true),
        })))
    }

    /// The configuration in force now (cheap; hold it only for the request).
    pub fn current(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The configuration in force now, to hold across an await.
    pub fn current_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Adds a step to every reload from now on (see [`ReloadHook`]).
    pub fn on_reload(&self, hook: ReloadHook) {
        self.reload_hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(hook);
    }

    /// Whether the configuration can be read again (it came from files).
    pub fn is_reloadable(&self) -> bool {
        self.reloader.is_some()
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Turns `/readyz` to 503: a shutdown has begun.
    pub fn start_draining(&self) {
        self.ready.store(false, Ordering::Relaxed);
    }

    /// Re-reads the configuration because of `trigger`, counting the attempt in
    /// `token_broker_config_reloads_total`; see [`AppState::reload_now`].
    pub fn reload(&self, trigger: ReloadTrigger) -> Result<ReloadReport, ReloadError> {
        let result = self.reload_now();
        let outcome = if result.is_ok() { "applied" } else { "refused" };
        self.metrics.config_reload(trigger.as_str(), outcome);
        result
    }

    /// Re-reads the configuration; keeps cached tokens of environments whose identity is
    /// unchanged (even with a rotated secret) and drops the others. An invalid configuration is
    /// refused and the old one keeps serving.
    fn reload_now(&self) -> Result<ReloadReport, ReloadError> {
        let reloader = self.reloader.as_ref().ok_or(ReloadError::NotReloadable)?;
        let _serialised = self
            .reloading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut settings = reloader()?;
        let old = self.current.load_full();
        // Every step ready before any is put in force: a certificate that does not match its
        // key refuses the reload and changes nothing.
        let commits = self
            .reload_hooks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|hook| hook(&settings))
            .collect::<Result<Vec<_>, String>>()
            .map_err(ReloadError::Apply)?;
        self.apply_shared_credentials(&settings, &old.settings)?;
        for commit in commits {
            commit();
        }
        let generation = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
        stamp_generations(&mut settings, &old.settings, generation);
        let dropped: Vec<Arc<EnvironmentSettings>> = old
            .settings
            .environments()
            .filter(|(tenant, environment, before)| {
                settings
                    .environment(tenant, environment)
                    .is_none_or(|after| !after.same_identity(before))
            })
            .map(|(_, _, before)| Arc::clone(before))
            .collect();
        let restart_required = settings.needing_restart(&self.started.settings);
        let report = ReloadReport {
            tenants: settings.tenants.len(),
            environments: settings.environments().count(),
            callers: settings.callers.len(),
            dropped: dropped
                .iter()
                .map(|e| format!("{}/{}", e.tenant, e.environment))
                .collect(),
            restart_required,
        };
        register_environments(&self.metrics, &settings);
        // The new settings first: a fetch that starts from now on uses them, and the generation
        // bump below stops any that began under the old ones from installing its token.
        self.current.store(Arc::new(Snapshot::new(
            settings,
            &self.metrics,
            Some(&old),
            &self.clock,
        )));
        self.broker.forget_environments(&dropped, generation);
        self.broker.forget_remembered();
        if !report.restart_required.is_empty() {
            tracing::warn!(
                settings = ?report.restart_required,
                "these changed settings take effect only after a restart"
            );
        }
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

impl AppState {
    /// Gives the shared level's client the credentials of `settings` when they changed since
    /// `running` and the level is the one the process started with (another needs a restart).
    fn apply_shared_credentials(
        &self,
        settings: &Settings,
        running: &Settings,
    ) -> Result<(), ReloadError> {
        let (Some(redis), Some(new), Some(old), Some(started)) = (
            &self.shared_cache,
            &settings.shared_cache,
            &running.shared_cache,
            &self.started.settings.shared_cache,
        ) else {
            return Ok(());
        };
        if !new.same_place(started) || new.same_as(old) {
            return Ok(());
        }
        redis
            .apply_credentials(new)
            .map_err(|error| ReloadError::Apply(error.to_string()))
    }
}

/// Gives each environment of freshly loaded `settings` its generation: the running one's when
/// it talks to its IdP the same way, else `generation` (this reload's).
fn stamp_generations(settings: &mut Settings, running: &Settings, generation: u64) {
    for (tenant, t) in &mut settings.tenants {
        for (name, environment) in &mut t.environments {
            let kept = running
                .environment(tenant, name)
                .filter(|before| before.same_identity(environment))
                .map(|before| before.generation);
            // Freshly loaded settings are not shared yet.
            if let Some(environment) = Arc::get_mut(environment) {
                environment.generation = kept.unwrap_or(generation);
            }
        }
    }
}

/// Shows every configured environment in the metrics from the start, at zero.
fn register_environments(metrics: &Metrics, settings: &Settings) {
    for (tenant, environment, settings) in settings.environments() {
        metrics.register_environment(tenant, environment, &settings.metrics);
        if settings.rotation.is_some() {
            metrics.register_rotation(tenant, environment);
        }
    }
}
