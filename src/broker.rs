//! The broker: tokens from cache or from the IdP, once per key.
//!
//! [`Broker::get`] is the heart of the service. A hit is a moka lookup and a pre-serialised body.
//! A miss goes through moka's `try_get_with`, so N concurrent misses on one key make exactly one
//! IdP request and every waiter receives its result, success or error (errors are shared, never
//! cached). Entries expire individually at `expires_at - min_remaining`, so a token with less
//! validity than that is never handed out. In the last `refresh_ahead` part of a token's life the
//! first request starts one background refresh and is served the current token at once.
//!
//! Failure policy: transient IdP failures are retried with exponential backoff and full jitter
//! within the environment's `timeout`; a 429 blocks that IdP client until its `Retry-After`; a
//! rejection is remembered per key for `negative_ttl`; the quota guard caps requests per hour.
//! While the IdP fails, callers keep the cached token as long as it has the validity they need.
//!
//! This module knows nothing about HTTP routes; `api` maps [`BrokerError`] to responses.

mod key;
mod token;
mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::Rng as _;

use crate::config::{CacheSettings, EnvironmentSettings};
use crate::idp::{IdpClient, IdpError};
use crate::telemetry::metrics::{IdpOutcome, Metrics};

pub use key::{ScopeSet, TokenKey};
pub use token::CachedToken;
pub use upstream::{MAX_CONCURRENT_FETCHES, Upstream};

/// How long callers are asked to wait after a transient IdP failure.
const RETRY_AFTER_TRANSIENT: Duration = Duration::from_secs(1);
/// How long an IdP client is left alone after a 429 that did not say.
const RETRY_AFTER_RATE_LIMITED: Duration = Duration::from_secs(10);
/// Most attempts of one fetch (the first and its retries).
const MAX_ATTEMPTS: u32 = 4;
/// Backoff before the first retry; doubled for each later one, before jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff between two attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Why no token could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The caller asked for more validity than a fresh token has.
    #[error(
        "min_ttl asks for {}s of validity but a freshly issued token lives only {}s; ask for less",
        required.as_secs(), lifetime.as_secs()
    )]
    MinTtlTooLong {
        /// What the caller required.
        required: Duration,
        /// The lifetime of a fresh token.
        lifetime: Duration,
    },
    /// The IdP issues tokens that live less than `cache.min_remaining`, so none can be served.
    #[error(
        "the IdP issues tokens that live {}s, less than cache.min_remaining ({}s); lower cache.min_remaining",
        lifetime.as_secs(), min_remaining.as_secs()
    )]
    LifetimeBelowMinimum {
        /// The lifetime of a fresh token.
        lifetime: Duration,
        /// The configured minimum.
        min_remaining: Duration,
    },
    /// The IdP refused the request; retrying will not help until configuration changes.
    #[error(
        "the IdP refused the token request (error '{code}'); check the client credentials and audience"
    )]
    Rejected {
        /// The IdP's OAuth2 error code.
        code: String,
        /// Why, for the log.
        #[source]
        source: IdpError,
    },
    /// The IdP answered 429 recently; no request goes to it before `retry_after`.
    #[error(
        "the IdP is rate limiting this client and no cached token is valid long enough; retry later"
    )]
    RateLimited {
        /// When the IdP allows requests again.
        retry_after: Duration,
    },
    /// The quota guard (`max_fetches_per_hour`) stopped the request.
    #[error(
        "the IdP request quota of this environment ({limit} per hour) is spent and no cached token is valid long enough; retry later"
    )]
    QuotaExhausted {
        /// The configured limit.
        limit: u32,
        /// When a request is allowed again.
        retry_after: Duration,
    },
    /// The IdP could not give a token now and no cached token has enough validity left.
    #[error("the IdP is unavailable and no cached token is valid long enough; retry later")]
    Unavailable {
        /// When callers may try again.
        retry_after: Duration,
        /// Why, for the log.
        #[source]
        source: IdpError,
    },
}

impl BrokerError {
    /// When a caller should try again, for failures that pass.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after }
            | Self::QuotaExhausted { retry_after, .. }
            | Self::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<IdpError> for BrokerError {
    fn from(error: IdpError) -> Self {
        match error {
            IdpError::Rejected { ref code, .. } => Self::Rejected {
                code: code.clone(),
                source: error,
            },
            IdpError::RateLimited { retry_after } => Self::Unavailable {
                retry_after: retry_after.unwrap_or(RETRY_AFTER_RATE_LIMITED),
                source: error,
            },
            _ => Self::Unavailable {
                retry_after: RETRY_AFTER_TRANSIENT,
                source: error,
            },
        }
    }
}

/// Whether a request was answered from cache or waited on the IdP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from cache without waiting.
    Hit,
    /// Waited on an IdP request (its own or another's).
    Miss,
}

impl CacheStatus {
    /// `hit` or `miss`, as in the `x-cache` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

/// A token handed to a caller, and how it was found.
#[derive(Debug)]
pub struct Lease {
    /// The token.
    pub token: Arc<CachedToken>,
    /// Hit or miss.
    pub status: CacheStatus,
}

/// Fetches, caches and refreshes tokens; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: Cache<TokenKey, Arc<CachedToken>>,
    /// Recent IdP rejections per key: (HTTP status, error code).
    rejections: Cache<TokenKey, (u16, String)>,
    /// Per (token URL, client id) state; a plain map because it only grows with configuration.
    upstreams: Mutex<HashMap<(String, String), Arc<Upstream>>>,
    idp: IdpClient,
    settings: CacheSettings,
    metrics: Metrics,
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, base * 2^(attempt-1))]`.
fn full_jitter(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// The cause chain of an error as one line, for logs.
fn error_cause(error: &dyn std::error::Error) -> String {
    let mut chain = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

/// Per-entry expiry: an entry leaves the cache `min_remaining` before its token expires.
struct TokenExpiry {
    min_remaining: Duration,
}

impl TokenExpiry {
    fn time_to_live(&self, token: &CachedToken) -> Option<Duration> {
        Some(
            token
                .remaining(SystemTime::now())
                .saturating_sub(self.min_remaining),
        )
    }
}

impl Expiry<TokenKey, Arc<CachedToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        token: &Arc<CachedToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        self.time_to_live(token)
    }

    fn expire_after_update(
        &self,
        _key: &TokenKey,
        token: &Arc<CachedToken>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // The default keeps the old entry's remaining time; a new token brings its own.
        self.time_to_live(token)
    }
}

impl Broker {
    /// Builds an empty broker that counts its work in `metrics`.
    pub fn new(settings: CacheSettings, idp: IdpClient, metrics: Metrics) -> Self {
        let tokens = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(TokenExpiry {
                min_remaining: settings.min_remaining,
            })
            .support_invalidation_closures()
            .build();
        let rejections = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
            .build();
        Self {
            inner: Arc::new(Inner {
                tokens,
                rejections,
                upstreams: Mutex::new(HashMap::new()),
                idp,
                settings,
                metrics,
            }),
        }
    }

    /// A token for `key` with at least `max(min_ttl, cache.min_remaining)` of validity left.
    pub async fn get(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        min_ttl: Option<Duration>,
    ) -> Result<Lease, Arc<BrokerError>> {
        let min_remaining = self.inner.settings.min_remaining;
        let required = min_ttl.map_or(min_remaining, |ttl| ttl.max(min_remaining));

        if let Some(token) = self.inner.tokens.get(key).await {
            let now = SystemTime::now();
            if token.remaining(now) >= required {
                token.record_hit();
                self.inner
                    .metrics
                    .cache_hit(&environment.tenant, &environment.environment);
                if now >= token.refresh_at && token.claim_refresh() {
                    self.spawn_refresh(Arc::clone(environment), key.clone());
                }
                return Ok(Lease {
                    token,
                    status: CacheStatus::Hit,
                });
            }
            // Too short for this caller, but maybe not for others: keep it while fetching.
            self.inner
                .metrics
                .cache_miss(&environment.tenant, &environment.environment);
            return self.replace_short(environment, key, required).await;
        }

        // Cold: concurrent misses share one fetch and its outcome.
        self.inner
            .metrics
            .cache_miss(&environment.tenant, &environment.environment);
        let started = SystemTime::now();
        let token = self
            .inner
            .tokens
            .try_get_with_by_ref(key, self.fetch(environment, key))
            .await?;
        self.lease_fresh(key, token, required, started).await
    }

    /// Fetches a token with more validity than the cached one, which keeps serving others
    /// meanwhile (and stays if the fetch fails). Such requests on one key queue behind each other,
    /// and those that find a good enough token after waiting do not fetch again.
    async fn replace_short(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        required: Duration,
    ) -> Result<Lease, Arc<BrokerError>> {
        let started = SystemTime::now();
        let computed = self
            .inner
            .tokens
            .entry_by_ref(key)
            .and_try_compute_with(|entry| async move {
                let enough = |token: &CachedToken| token.remaining(SystemTime::now()) >= required;
                match entry {
                    Some(entry) if enough(entry.value()) => Ok(Op::Nop),
                    _ => self.fetch(environment, key).await.map(Op::Put),
                }
            })
            .await
            .map_err(Arc::new)?;
        match computed {
            CompResult::Inserted(entry)
            | CompResult::ReplacedWith(entry)
            | CompResult::Unchanged(entry) => {
                self.lease_fresh(key, entry.into_value(), required, started)
                    .await
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                unreachable!("the compute closure never removes and always puts when empty")
            }
        }
    }

    /// Leases a token that waited on a fetch, or explains why it cannot serve this request.
    async fn lease_fresh(
        &self,
        key: &TokenKey,
        token: Arc<CachedToken>,
        required: Duration,
        started: SystemTime,
    ) -> Result<Lease, Arc<BrokerError>> {
        // A token fetched after this request began is as fresh as any can be, so its whole
        // lifetime counts; `expires_in` then shows the fraction of a second already gone.
        let lifetime = token.lifetime();
        let fresh = token.fetched_at >= started;
        if token.remaining(SystemTime::now()) >= required || (fresh && lifetime >= required) {
            token.record_hit();
            return Ok(Lease {
                token,
                status: CacheStatus::Miss,
            });
        }
        let min_remaining = self.inner.settings.min_remaining;
        if fresh && lifetime < min_remaining {
            self.forget_entry(key, &token).await;
            return Err(Arc::new(BrokerError::LifetimeBelowMinimum {
                lifetime,
                min_remaining,
            }));
        }
        Err(Arc::new(BrokerError::MinTtlTooLong { required, lifetime }))
    }

    /// Forgets the cached token of `key`, whatever it is.
    pub async fn forget(&self, key: &TokenKey) {
        self.inner.tokens.invalidate(key).await;
    }

    /// Forgets the cached token of `key` only if it is still `access_token` (compare-and-delete).
    pub async fn forget_if(&self, key: &TokenKey, access_token: &str) {
        self.inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if entry.value().is(access_token) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// Forgets every cached token of the given (tenant, environment) pairs, as after a reload
    /// that changed how those environments talk to their IdP.
    pub fn forget_environments(&self, environments: Vec<(String, String)>) {
        if environments.is_empty() {
            return;
        }
        let predicate = move |key: &TokenKey, _: &Arc<CachedToken>| {
            environments
                .iter()
                .any(|(t, e)| *key.tenant == **t && *key.environment == **e)
        };
        if let Err(error) = self.inner.tokens.invalidate_entries_if(predicate) {
            tracing::error!(%error, "cannot forget the tokens of changed environments");
        }
    }

    /// Every cached entry (for the admin API; never token values).
    pub fn entries(&self) -> Vec<(Arc<TokenKey>, Arc<CachedToken>)> {
        self.inner.tokens.iter().collect()
    }

    /// How many entries the cache holds (approximate, as moka counts).
    pub fn entry_count(&self) -> u64 {
        self.inner.tokens.entry_count()
    }

    async fn forget_entry(&self, key: &TokenKey, stale: &Arc<CachedToken>) {
        self.inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if Arc::ptr_eq(entry.value(), stale) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// The shared state of the IdP client `environment` talks to.
    fn upstream(&self, environment: &EnvironmentSettings) -> Arc<Upstream> {
        let id = (
            environment.token_url.as_str().to_owned(),
            environment.client_id.clone(),
        );
        let mut upstreams = self
            .inner
            .upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(upstreams.entry(id).or_default())
    }

    /// The rate-limit headers last seen from `environment`'s IdP client.
    pub fn rate_limit(&self, environment: &EnvironmentSettings) -> crate::idp::RateLimitHeaders {
        self.upstream(environment).rate_limit()
    }

    /// Forgets remembered rejections (after a reload that may have fixed credentials).
    pub fn forget_rejections(&self) {
        self.inner.rejections.invalidate_all();
    }

    /// One token from the IdP, with the failure policy applied (see the module docs).
    async fn fetch(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        if let Some((status, code)) = self.inner.rejections.get(key).await {
            return Err(IdpError::Rejected { status, code }.into());
        }
        let upstream = self.upstream(environment);
        let deadline = Instant::now() + environment.timeout;
        let mut attempt = 1;
        loop {
            let now = Instant::now();
            if let Some(retry_after) = upstream.blocked_for(now) {
                return Err(BrokerError::RateLimited { retry_after });
            }
            let result = tokio::time::timeout_at(deadline.into(), async {
                let _permit = upstream.permits.acquire().await.expect("never closed");
                if let Err(retry_after) =
                    upstream.take_quota(Instant::now(), environment.max_fetches_per_hour)
                {
                    self.record_idp(environment, IdpOutcome::QuotaExhausted, None);
                    return Err(BrokerError::QuotaExhausted {
                        limit: environment.max_fetches_per_hour.unwrap_or_default(),
                        retry_after,
                    });
                }
                let asked = Instant::now();
                let answer = self
                    .inner
                    .idp
                    .fetch(environment, &key.audience, key.scope.as_str())
                    .await;
                self.record_idp(environment, IdpOutcome::of(&answer), Some(asked.elapsed()));
                answer.map_err(BrokerError::from)
            })
            .await
            .unwrap_or_else(|_| {
                self.record_idp(environment, IdpOutcome::Timeout, None);
                Err(BrokerError::from(IdpError::Timeout(environment.timeout)))
            });

            let error = match result {
                Ok(fetched) => {
                    upstream.record_rate_limit(fetched.rate_limit);
                    tracing::info!(
                        tenant = %key.tenant,
                        environment = %key.environment,
                        attempt,
                        lifetime_s = fetched.token.lifetime.as_secs(),
                        "fetched a token from the IdP"
                    );
                    return Ok(Arc::new(CachedToken::new(
                        fetched.token,
                        SystemTime::now(),
                        self.inner.settings.refresh_ahead,
                        rand::rng().random(),
                    )));
                }
                Err(error) => error,
            };
            let log = |message: &str| {
                tracing::warn!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    attempt,
                    error = %error,
                    cause = %error_cause(&error),
                    "{message}"
                );
            };
            match &error {
                BrokerError::QuotaExhausted { limit, .. } => {
                    tracing::error!(
                        tenant = %key.tenant,
                        environment = %key.environment,
                        limit,
                        "quota guard: max_fetches_per_hour reached, not asking the IdP"
                    );
                    return Err(error);
                }
                BrokerError::Rejected {
                    source: IdpError::Rejected { status, code },
                    ..
                } => {
                    log(
                        "the IdP rejected the token request; remembering it for cache.negative_ttl",
                    );
                    if !self.inner.settings.negative_ttl.is_zero() {
                        self.inner
                            .rejections
                            .insert(key.clone(), (*status, code.clone()))
                            .await;
                    }
                    return Err(error);
                }
                BrokerError::Unavailable {
                    source: IdpError::RateLimited { .. },
                    retry_after,
                } => {
                    log("the IdP is rate limiting this client; pausing requests to it");
                    upstream.block(Instant::now(), *retry_after);
                    return Err(error);
                }
                BrokerError::Unavailable { source, .. } if source.is_transient() => {
                    let backoff = full_jitter(attempt);
                    if attempt >= MAX_ATTEMPTS || Instant::now() + backoff >= deadline {
                        log("token request failed; giving up");
                        return Err(error);
                    }
                    log("token request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
                _ => {
                    log("token request failed");
                    return Err(error);
                }
            }
        }
    }

    /// Counts one IdP request (or one the quota guard stopped) of `environment`.
    fn record_idp(
        &self,
        environment: &EnvironmentSettings,
        outcome: IdpOutcome,
        took: Option<Duration>,
    ) {
        let (tenant, name) = (&environment.tenant, &environment.environment);
        self.inner.metrics.idp_request(tenant, name, outcome, took);
    }

    /// Starts one background refresh of `key`; the current token keeps being served meanwhile.
    fn spawn_refresh(&self, environment: Arc<EnvironmentSettings>, key: TokenKey) {
        self.inner
            .metrics
            .cache_refresh(&environment.tenant, &environment.environment);
        let broker = self.clone();
        tokio::spawn(async move {
            match broker.fetch(&environment, &key).await {
                Ok(token) => broker.inner.tokens.insert(key, token).await,
                Err(_) => {
                    // Already logged; let a later request try again.
                    if let Some(current) = broker.inner.tokens.get(&key).await {
                        current.release_refresh();
                    }
                }
            }
        });
    }
}
