//! Prometheus metrics: one registry per application, with handles registered before they are
//! needed.
//!
//! Each [`Metrics`] owns its own `PrometheusRecorder`, which is never installed as the process's
//! global recorder, so several applications in one process (the integration tests) each count
//! only their own traffic; nothing here uses the `metrics` macros. Handles are registered once per
//! label set and kept, so recording an event on the hot path is a lookup without allocation and
//! an atomic add. Label values are bounded: configured tenant and environment names, the matched
//! route templates, a fixed list of methods, status codes and IdP outcomes; never audiences,
//! scopes, raw paths or keys.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
mod http;
mod outcome;
mod rotation;

pub use rotation::{SECRET_ROTATED_AT, SECRET_ROTATION_DUE, SECRET_ROTATIONS};

pub use http::{HttpMetrics, RouteMemo};
pub use outcome::IdpOutcome;

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Requests served, by `route`, `method` and `status`.
pub const HTTP_REQUESTS: &str = "token_broker_http_requests_total";
/// Token requests answered from the cache, by `tenant` and `environment`.
pub const CACHE_HITS: &str = "token_broker_cache_hits_total";
/// Token requests that had to wait on an IdP request, by `tenant` and `environment`.
pub const CACHE_MISSES: &str = "token_broker_cache_misses_total";
/// Background refreshes started ahead of expiry, by `tenant` and `environment`.
pub const CACHE_REFRESHES: &str = "token_broker_cache_refreshes_total";
/// Background refreshes that ended without a new token, by `tenant` and `environment`.
pub const CACHE_REFRESH_FAILURES: &str = "token_broker_cache_refresh_failures_total";
/// Gauge: 1 while `/readyz` answers 200, 0 while draining.
pub const READY: &str = "token_broker_ready";
/// Tokens in the cache now.
pub const CACHE_ENTRIES: &str = "token_broker_cache_entries";
/// Token requests to IdPs, by `tenant`, `environment` and `outcome`.
pub const IDP_REQUESTS: &str = "token_broker_idp_requests_total";
/// Time IdPs took to answer token requests, by `tenant` and `environment`.
pub const IDP_DURATION: &str = "token_broker_idp_request_duration_seconds";
/// The IdP's `x-ratelimit-remaining` on its latest answer, by `tenant` and `environment`.
pub const IDP_RATE_LIMIT_REMAINING: &str = "token_broker_idp_rate_limit_remaining";
/// Gauge: Auth0 M2M token quota left, by `entity` (client, organization) and `bucket`.
pub const IDP_QUOTA_REMAINING: &str = "token_broker_idp_quota_remaining";
/// IdP requests that callers' requests started, by `caller`.
pub const CALLER_IDP_REQUESTS: &str = "token_broker_caller_idp_requests_total";
/// Requests refused for a caller's own limits, by `caller` and `reason` (`rate_limit`,
/// `idp_budget`, `max_keys`).
pub const CALLER_REFUSALS: &str = "token_broker_caller_refusals_total";
/// Gauge: 1 while calls to the shared cache succeed, 0 while it is marked down.
pub const SHARED_CACHE_UP: &str = "token_broker_shared_cache_up";
/// Gauge: 1 while the shared cache's invalidation subscription is live.
pub const SHARED_CACHE_SUBSCRIBED: &str = "token_broker_shared_cache_subscribed";
/// Failed calls to the shared cache.
pub const SHARED_CACHE_ERRORS: &str = "token_broker_shared_cache_errors_total";
/// Other replicas' announcements received through the shared cache.
pub const SHARED_CACHE_INVALIDATIONS: &str = "token_broker_shared_cache_invalidations_total";
/// Redis masters the broker moved to as the sentinels named them (the first one found at start
/// included, so a failover shows as an increase beyond 1).
pub const SHARED_CACHE_MASTER_CHANGES: &str = "token_broker_shared_cache_master_changes_total";
/// Counter: tokens fetched with an environment's second credential.
pub const CREDENTIAL_FALLBACKS: &str = "token_broker_client_credential_fallbacks_total";
/// Counter: configuration reloads tried, by `trigger` and `outcome`.
pub const CONFIG_RELOADS: &str = "token_broker_config_reloads_total";
/// Workload tokens refused, by the `check` they failed.
pub const WORKLOAD_REJECTIONS: &str = "token_broker_workload_rejections_total";
/// Fetches of a workload issuer's keys, by `issuer` and `outcome` (`ok`, `failed`).
pub const WORKLOAD_KEY_FETCHES: &str = "token_broker_workload_key_fetches_total";
/// Requests to IdPs for user tokens, by `tenant`, `environment`, `grant` and `outcome`.
pub const USER_IDP_REQUESTS: &str = "token_broker_user_idp_requests_total";
/// Gauge: user sessions held in this replica's memory.
pub const USER_SESSIONS: &str = "token_broker_user_sessions";
/// Gauge: user sessions whose latest tokens are not in the shared cache yet.
pub const USER_SESSIONS_UNWRITTEN: &str = "token_broker_user_sessions_unwritten";

/// What the shared level is doing, for logs and metrics (the broker reports it, `/metrics`
/// shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedCacheStatus {
    /// Calls succeed (false: skipped until a health probe succeeds).
    pub up: bool,
    /// The invalidation subscription is live.
    pub subscribed: bool,
    /// Failed calls since start.
    pub errors: u64,
    /// Other replicas' announcements received since start.
    pub invalidations: u64,
    /// Masters moved to since start (behind Sentinel: the first one found included).
    pub master_changes: u64,
}

impl SharedCacheStatus {
    /// Both calls and invalidations work.
    pub fn healthy(&self) -> bool {
        self.up && self.subscribed
    }
}

/// Always 1, labelled with the running `version`.
pub const BUILD_INFO: &str = "token_broker_build_info";

/// Upper bounds of the IdP latency histogram's buckets, in seconds.
const IDP_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The `metrics` metadata of every handle registered here (the Prometheus recorder ignores it).
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// Where the settings of an environment keep the handles of its metrics, filled when the
/// application registers the environment, so that counting a cache hit needs no lookup by name.
#[derive(Default)]
pub struct EnvironmentHandles(OnceLock<Arc<EnvironmentMetrics>>);

/// The handles of one (tenant, environment).
pub struct EnvironmentMetrics {
    cache_hits: Counter,
    cache_misses: Counter,
    cache_refreshes: Counter,
    cache_refresh_failures: Counter,
    idp_requests: [Counter; IdpOutcome::ALL.len()],
    idp_duration: Histogram,
}

/// Tenant → environment → handles; replaced whole when an environment is added. Looked up on
/// every token request, so hashed with foldhash (the keys are configured names).
type EnvironmentMap = HashMap<Box<str>, HashMap<Box<str>, Arc<EnvironmentMetrics>>>;

/// One application's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    environments: ArcSwap<EnvironmentMap>,
    /// Serialises additions to `environments` so none is lost.
    adding_environment: Mutex<()>,
    cache_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A new, empty registry with every metric described.
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(IDP_DURATION.to_owned()),
                &IDP_DURATION_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        for (name, help) in [
            (
                HTTP_REQUESTS,
                "Requests served, by matched route, method and status.",
            ),
            (CACHE_HITS, "Token requests answered from the cache."),
            (
                CACHE_MISSES,
                "Token requests the cache did not answer: those that waited on an IdP request, and those refused without one (a 429 pause, a remembered rejection, a min_ttl too long).",
            ),
            (
                CACHE_REFRESHES,
                "Background token refreshes started before expiry.",
            ),
            (IDP_REQUESTS, "Token requests to the IdP, by outcome."),
            (
                CACHE_REFRESH_FAILURES,
                "Background token refreshes that ended without a new token (retried after a backoff).",
            ),
            (
                CALLER_IDP_REQUESTS,
                "IdP requests that a caller's requests started (charged to its idp_requests_per_minute).",
            ),
            (
                CALLER_REFUSALS,
                "Requests refused with 429 for the caller's own limits, by reason (rate_limit, idp_budget, max_keys).",
            ),
            (
                SHARED_CACHE_ERRORS,
                "Failed calls to the shared cache (Redis).",
            ),
            (
                SHARED_CACHE_INVALIDATIONS,
                "Other replicas' announcements received through the shared cache.",
            ),
            (
                WORKLOAD_REJECTIONS,
                "Workload tokens refused with 401, by the check they failed.",
            ),
            (
                WORKLOAD_KEY_FETCHES,
                "Fetches of a workload issuer's JWKS, by issuer and outcome (ok, failed).",
            ),
            (
                USER_IDP_REQUESTS,
                "Requests to the IdP for user tokens, by grant (authorization_code, refresh_token, revocation) and outcome.",
            ),
            (
                CREDENTIAL_FALLBACKS,
                "Tokens fetched with an environment's fallback credential after the IdP refused the configured one: finish the rotation.",
            ),
            (
                SECRET_ROTATIONS,
                "Client secret rotations the broker made or tried, by outcome (rotated, failed).",
            ),
            (
                CONFIG_RELOADS,
                "Configuration reloads tried, by trigger (file, signal, admin) and outcome (applied, refused).",
            ),
            (
                SHARED_CACHE_MASTER_CHANGES,
                "Redis masters the broker moved to, as the sentinels named them (the first included).",
            ),
        ] {
            recorder.describe_counter(KeyName::from(name), None, SharedString::from(help));
        }
        for (name, help) in [
            (CACHE_ENTRIES, "Tokens held in the cache."),
            (
                USER_SESSIONS,
                "User sessions held in this replica's memory.",
            ),
            (
                USER_SESSIONS_UNWRITTEN,
                "User sessions whose latest tokens could not be written to the shared cache yet.",
            ),
            (
                READY,
                "1 while /readyz answers 200, 0 while draining on shutdown.",
            ),
            (
                SHARED_CACHE_UP,
                "1 while calls to the shared cache succeed, 0 while it is marked down.",
            ),
            (
                SHARED_CACHE_SUBSCRIBED,
                "1 while the shared cache's invalidation subscription is live.",
            ),
            (
                IDP_RATE_LIMIT_REMAINING,
                "The IdP's x-ratelimit-remaining on its latest token answer.",
            ),
            (
                IDP_QUOTA_REMAINING,
                "Auth0 M2M tokens left in a quota bucket (auth0-*-quota-limit), by entity and bucket.",
            ),
            (
                BUILD_INFO,
                "Always 1; the version label names the running build.",
            ),
            (
                SECRET_ROTATED_AT,
                "When the client secret in force was rotated by the broker, Unix seconds.",
            ),
            (
                SECRET_ROTATION_DUE,
                "When the next scheduled client secret rotation is due, Unix seconds.",
            ),
        ] {
            recorder.describe_gauge(KeyName::from(name), None, SharedString::from(help));
        }
        recorder.describe_histogram(
            KeyName::from(IDP_DURATION),
            Some(metrics::Unit::Seconds),
            SharedString::from("Time the IdP took to answer a token request."),
        );
        let cache_entries = recorder.register_gauge(&Key::from_name(CACHE_ENTRIES), &METADATA);
        recorder
            .register_gauge(
                &Key::from_parts(
                    BUILD_INFO,
                    vec![Label::from_static_parts(
                        "version",
                        env!("CARGO_PKG_VERSION"),
                    )],
                ),
                &METADATA,
            )
            .set(1.0);
        let handle = recorder.handle();
        Self {
            inner: Arc::new(Inner {
                recorder,
                handle,
                environments: ArcSwap::default(),
                adding_environment: Mutex::new(()),
                cache_entries,
            }),
        }
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> String {
        self.inner.handle.render()
    }

    /// Moves recorded histogram samples into their buckets; call every few seconds so that memory
    /// stays bounded between scrapes.
    pub fn run_upkeep(&self) {
        self.inner.handle.run_upkeep();
    }

    /// Registers the metrics of an environment, so they show (at zero) before its first request,
    /// and keeps their handles in `handles`, the environment's settings.
    pub fn register_environment(
        &self,
        tenant: &str,
        environment: &str,
        handles: &EnvironmentHandles,
    ) {
        let _ = handles.0.set(self.environment(tenant, environment));
    }

    /// The counter of IdP requests charged to `caller` (a configured name), registered so that
    /// it shows at zero.
    pub fn caller_idp_requests(&self, caller: &str) -> Counter {
        let key = Key::from_parts(
            CALLER_IDP_REQUESTS,
            vec![Label::new("caller", caller.to_owned())],
        );
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// The counter of `caller`'s requests refused for `reason` (`rate_limit`, `idp_budget` or
    /// `max_keys`), registered so that it shows at zero.
    pub fn caller_refusals(&self, caller: &str, reason: &'static str) -> Counter {
        let key = Key::from_parts(
            CALLER_REFUSALS,
            vec![
                Label::new("caller", caller.to_owned()),
                Label::from_static_parts("reason", reason),
            ],
        );
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// Counts one configuration reload tried by `trigger`, with its `outcome`.
    pub fn config_reload(&self, trigger: &'static str, outcome: &'static str) {
        let key = Key::from_parts(
            CONFIG_RELOADS,
            vec![
                Label::from_static_parts("trigger", trigger),
                Label::from_static_parts("outcome", outcome),
            ],
        );
        self.inner
            .recorder
            .register_counter(&key, &METADATA)
            .increment(1);
    }

    /// The counter of workload tokens refused for `check` (one of a closed list).
    pub fn workload_rejections(&self, check: &'static str) -> Counter {
        let key = Key::from_parts(
            WORKLOAD_REJECTIONS,
            vec![Label::from_static_parts("check", check)],
        );
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// The counter of fetches of `issuer`'s keys (a configured issuer) with `outcome`.
    pub fn workload_key_fetches(&self, issuer: &str, outcome: &'static str) -> Counter {
        let key = Key::from_parts(
            WORKLOAD_KEY_FETCHES,
            vec![
                Label::new("issuer", issuer.to_owned()),
                Label::from_static_parts("outcome", outcome),
            ],
        );
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// Counts one request to `tenant`/`environment`'s IdP for a user token with `grant`.
    pub fn user_idp_request(
        &self,
        tenant: &str,
        environment: &str,
        grant: &'static str,
        outcome: IdpOutcome,
    ) {
        let key = Key::from_parts(
            USER_IDP_REQUESTS,
            vec![
                Label::new("tenant", tenant.to_owned()),
                Label::new("environment", environment.to_owned()),
                Label::from_static_parts("grant", grant),
                Label::from_static_parts("outcome", outcome.as_str()),
            ],
        );
        self.inner
            .recorder
            .register_counter(&key, &METADATA)
            .increment(1);
    }

    /// Counts a token request served from the cache: through `handles` when
    /// [`Metrics::register_environment`] filled them, so that a hit does not look its counters
    /// up by name, else by name.
    pub fn cache_hit(&self, handles: &EnvironmentHandles, tenant: &str, environment: &str) {
        match handles.0.get() {
            Some(metrics) => metrics.cache_hits.increment(1),
            None => self
                .environment(tenant, environment)
                .cache_hits
                .increment(1),
        }
    }

    /// Counts a token request that waits on an IdP request.
    pub fn cache_miss(&self, tenant: &str, environment: &str) {
        self.environment(tenant, environment)
            .cache_misses
            .increment(1);
    }

    /// Counts a background refresh that ended without a new token.
    pub fn cache_refresh_failed(&self, tenant: &str, environment: &str) {
        self.environment(tenant, environment)
            .cache_refresh_failures
            .increment(1);
    }

    /// Sets whether the broker is ready (at scrape time).
    pub fn set_ready(&self, ready: bool) {
        let key = Key::from_name(READY);
        self.inner
            .recorder
            .register_gauge(&key, &METADATA)
            .set(f64::from(u8::from(ready)));
    }

    /// Counts a background refresh started.
    pub fn cache_refresh(&self, tenant: &str, environment: &str) {
        self.environment(tenant, environment)
            .cache_refreshes
            .increment(1);
    }

    /// Counts one token request to an IdP and, when it was answered, how long that took.
    pub fn idp_request(
        &self,
        tenant: &str,
        environment: &str,
        outcome: IdpOutcome,
        took: Option<Duration>,
    ) {
        let metrics = self.environment(tenant, environment);
        metrics.idp_requests[outcome.index()].increment(1);
        if let Some(took) = took {
            metrics.idp_duration.record(took.as_secs_f64());
        }
    }

    /// Sets the shared cache's state (at scrape time): up and subscribed as 1/0, and its error,
    /// invalidation and master-change counts since start.
    pub fn set_shared_cache(&self, state: SharedCacheStatus) {
        let SharedCacheStatus {
            up,
            subscribed,
            errors,
            invalidations,
            master_changes,
        } = state;
        let recorder = &self.inner.recorder;
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_name(name), &METADATA);
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_name(name), &METADATA);
        gauge(SHARED_CACHE_UP).set(f64::from(u8::from(up)));
        gauge(SHARED_CACHE_SUBSCRIBED).set(f64::from(u8::from(subscribed)));
        counter(SHARED_CACHE_ERRORS).absolute(errors);
        counter(SHARED_CACHE_INVALIDATIONS).absolute(invalidations);
        counter(SHARED_CACHE_MASTER_CHANGES).absolute(master_changes);
    }

    /// Sets the number of cached tokens.
    pub fn set_cache_entries(&self, entries: usize) {
        self.inner.cache_entries.set(entries as f64);
    }

    /// Sets the user sessions held in memory, and those whose tokens are still to be written.
    pub fn set_user_sessions(&self, held: u64, unwritten: usize) {
        for (name, value) in [
            (USER_SESSIONS, held as f64),
            (USER_SESSIONS_UNWRITTEN, unwritten as f64),
        ] {
            let key = Key::from_name(name);
            self.inner
                .recorder
                .register_gauge(&key, &METADATA)
                .set(value);
        }
    }

    /// Sets the IdP's rate-limit remaining for an environment (at scrape time, not on a hot path).
    pub fn set_idp_rate_limit_remaining(&self, tenant: &str, environment: &str, remaining: u64) {
        let key = Key::from_parts(
            IDP_RATE_LIMIT_REMAINING,
            environment_labels(tenant, environment),
        );
        self.inner
            .recorder
            .register_gauge(&key, &METADATA)
            .set(remaining as f64);
    }

    /// Sets the IdP's M2M token quota left in one bucket (at scrape time).
    pub fn set_idp_quota_remaining(
        &self,
        tenant: &str,
        environment: &str,
        entity: &'static str,
        bucket: &'static str,
        remaining: u64,
    ) {
        let mut labels = environment_labels(tenant, environment);
        labels.push(Label::new("entity", entity));
        labels.push(Label::new("bucket", bucket));
        let key = Key::from_parts(IDP_QUOTA_REMAINING, labels);
        self.inner
            .recorder
            .register_gauge(&key, &METADATA)
            .set(remaining as f64);
    }

    /// The handles of (tenant, environment), registering them the first time.
    fn environment(&self, tenant: &str, environment: &str) -> Arc<EnvironmentMetrics> {
        let found = |map: &EnvironmentMap| map.get(tenant)?.get(environment).cloned();
        if let Some(metrics) = found(&self.inner.environments.load()) {
            return metrics;
        }
        let _adding = self
            .inner
            .adding_environment
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.inner.environments.load_full();
        match found(&current) {
            Some(metrics) => metrics,
            None => {
                let metrics = Arc::new(self.register(tenant, environment));
                let mut map = EnvironmentMap::clone(&current);
                map.entry(Box::from(tenant))
                    .or_default()
                    .insert(Box::from(environment), Arc::clone(&metrics));
                self.inner.environments.store(Arc::new(map));
                metrics
            }
        }
    }

    fn register(&self, tenant: &str, environment: &str) -> EnvironmentMetrics {
        let recorder = &self.inner.recorder;
        let labels = || environment_labels(tenant, environment);
        let counter = |name: &'static str| {
            recorder.register_counter(&Key::from_parts(name, labels()), &METADATA)
        };
        EnvironmentMetrics {
            cache_hits: counter(CACHE_HITS),
            cache_misses: counter(CACHE_MISSES),
            cache_refreshes: counter(CACHE_REFRESHES),
            cache_refresh_failures: counter(CACHE_REFRESH_FAILURES),
            idp_requests: IdpOutcome::ALL.map(|outcome| {
                let mut labels = labels();
                labels.push(Label::from_static_parts("outcome", outcome.as_str()));
                recorder.register_counter(&Key::from_parts(IDP_REQUESTS, labels), &METADATA)
            }),
            idp_duration: recorder
                .register_histogram(&Key::from_parts(IDP_DURATION, labels()), &METADATA),
        }
    }
}

fn environment_labels(tenant: &str, environment: &str) -> Vec<Label> {
    vec![
        Label::new("tenant", tenant.to_owned()),
        Label::new("environment", environment.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use axum::http::{Method, StatusCode};

    use super::*;

    #[test]
    fn each_registry_counts_alone_and_renders_labels() {
        let one = Metrics::new();
        let other = Metrics::new();
        // Handles remembered for one registry are not used for another.
        let handles = EnvironmentHandles::default();
        one.cache_hit(&handles, "acme", "production");
        one.cache_hit(&handles, "acme", "production");
        other.cache_hit(&handles, "beta", "staging");
        one.idp_request(
            "acme",
            "production",
            IdpOutcome::Timeout,
            Some(Duration::from_millis(20)),
        );
        let http = one.http(["/livez", "/v1/tokens/{tenant}/{environment}"]);
        http.record(
            &RouteMemo::default(),
            Some("/livez"),
            &Method::GET,
            StatusCode::OK,
        );
        http.record(
            &RouteMemo::default(),
            Some("/raw/path"),
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::IM_A_TEAPOT,
        );

        let text = one.render();
        for line in [
            r#"token_broker_cache_hits_total{tenant="acme",environment="production"} 2"#,
            r#"token_broker_idp_requests_total{tenant="acme",environment="production",outcome="timeout"} 1"#,
            r#"token_broker_idp_requests_total{tenant="acme",environment="production",outcome="ok"} 0"#,
            r#"token_broker_idp_request_duration_seconds_bucket{tenant="acme",environment="production",le="0.025"} 1"#,
            r#"token_broker_http_requests_total{route="/livez",method="GET",status="200"} 1"#,
            r#"token_broker_http_requests_total{route="unmatched",method="other",status="418"} 1"#,
            r#"token_broker_build_info{version=""#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(!other.render().contains("acme"));
        assert!(
            other.render().contains(
                r#"token_broker_cache_hits_total{tenant="beta",environment="staging"} 1"#
            )
        );
    }
}
