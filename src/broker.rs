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
//! With a shared level ([`SharedCache`], Redis), a miss looks there before the IdP, from inside
//! the single-flight fetch, so hits never touch the network. One replica per key takes a short
//! lock and asks the IdP; the others poll the shared level for its token, within
//! `shared_cache.wait_for_peer`, then ask the IdP themselves rather than fail. Fetched and
//! refreshed tokens are stored there and announced; `DELETE`s are applied there and announced;
//! every replica applies the announcements of the others to its own cache. Any failure of the
//! shared level makes the broker behave as if it had none.
//!
//! This module knows nothing about HTTP routes; `api` maps [`BrokerError`] to responses.

mod key;
mod settings;
mod shared;
mod token;
mod upstream;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::Rng as _;
use tokio::sync::mpsc;

use crate::idp::{EnvironmentSettings, IdpClient, IdpError};
use crate::telemetry::metrics::{IdpOutcome, Metrics};

pub use key::{ScopeSet, TokenKey};
pub use settings::CacheSettings;
pub use shared::{
    Invalidation, LockToken, SharedCache, SharedCacheError, SharedCacheStatus, SharedFuture,
    SharedKey, SharedToken, TokenDigest,
};
pub use token::CachedToken;
pub use upstream::Upstream;

/// The hasher of cache keys: foldhash, randomly seeded per process, in place of SipHash (keys are
/// short strings, hashed on every hit).
type KeyHasher = foldhash::quality::RandomState;

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
/// How often a replica looks for the token another replica is fetching.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(20);

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
    tokens: Cache<TokenKey, Arc<CachedToken>, KeyHasher>,
    /// Recent IdP rejections per key: (HTTP status, error code).
    rejections: Cache<TokenKey, (u16, String), KeyHasher>,
    /// Per (token URL, client id) state; a plain map because it only grows with configuration.
    upstreams: Mutex<HashMap<(String, String), Arc<Upstream>>>,
    idp: IdpClient,
    settings: CacheSettings,
    /// The level shared with other replicas, when configured.
    shared: Option<Arc<dyn SharedCache>>,
    /// How long to wait for a token another replica is fetching.
    wait_for_peer: Duration,
    metrics: Metrics,
}

/// Which token from the shared level can serve a fetch.
#[derive(Clone, Copy)]
enum Wanted {
    /// One with at least this much validity left (a miss, or a caller who needs more).
    Remaining(Duration),
    /// One fetched after this instant (a refresh, which another replica may have made already).
    FetchedAfter(SystemTime),
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
    /// Builds an empty broker with no shared level that counts its work in `metrics`.
    pub fn new(settings: CacheSettings, idp: IdpClient, metrics: Metrics) -> Self {
        Self::build(settings, idp, metrics, None, Duration::ZERO)
    }

    /// Builds an empty broker with a level shared by every replica, and starts applying the
    /// other replicas' changes to it (must run inside a Tokio runtime).
    pub fn with_shared_cache(
        settings: CacheSettings,
        idp: IdpClient,
        metrics: Metrics,
        shared: Arc<dyn SharedCache>,
        wait_for_peer: Duration,
    ) -> Self {
        let events = shared.subscribe();
        let broker = Self::build(settings, idp, metrics, Some(shared), wait_for_peer);
        broker.spawn_invalidations(events);
        broker
    }

    fn build(
        settings: CacheSettings,
        idp: IdpClient,
        metrics: Metrics,
        shared: Option<Arc<dyn SharedCache>>,
        wait_for_peer: Duration,
    ) -> Self {
        let tokens = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(TokenExpiry {
                min_remaining: settings.min_remaining,
            })
            .support_invalidation_closures()
            .build_with_hasher(KeyHasher::default());
        let rejections = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
            .build_with_hasher(KeyHasher::default());
        Self {
            inner: Arc::new(Inner {
                tokens,
                rejections,
                upstreams: Mutex::new(HashMap::new()),
                idp,
                settings,
                shared,
                wait_for_peer,
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
                    self.spawn_refresh(Arc::clone(environment), key.clone(), token.fetched_at);
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
            .try_get_with_by_ref(
                key,
                self.fetch(environment, key, Wanted::Remaining(required)),
            )
            .await?;
        if token.fetched_at < started && token.remaining(SystemTime::now()) < required {
            // An older token (another caller's fetch, or the shared level) too short for this one.
            return self.replace_short(environment, key, required).await;
        }
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
                    _ => self
                        .fetch(environment, key, Wanted::Remaining(required))
                        .await
                        .map(Op::Put),
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
        // lifetime counts; `expires_in` then shows the fraction of a second already gone. Such a
        // request waited on an IdP request (its own, or another caller's or replica's): a miss.
        // An older one was already there (found in the shared level, say): a hit.
        let lifetime = token.lifetime();
        let fresh = token.fetched_at >= started;
        if token.remaining(SystemTime::now()) >= required || (fresh && lifetime >= required) {
            token.record_hit();
            let status = if fresh {
                CacheStatus::Miss
            } else {
                CacheStatus::Hit
            };
            return Ok(Lease { token, status });
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

    /// Forgets the cached token of `key`, whatever it is, on every replica.
    pub async fn forget(&self, environment: &EnvironmentSettings, key: &TokenKey) {
        if let Some(shared) = &self.inner.shared {
            // The shared level first: a miss here in between must not find the old token there.
            let _ = shared.delete(&SharedKey::new(environment, key), None).await;
        }
        self.inner.tokens.invalidate(key).await;
    }

    /// Forgets the cached token of `key` only if it is still `access_token` (compare-and-delete),
    /// on every replica.
    pub async fn forget_if(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        access_token: &str,
    ) {
        if let Some(shared) = &self.inner.shared {
            let digest = TokenDigest::of(access_token);
            let _ = shared
                .delete(&SharedKey::new(environment, key), Some(digest))
                .await;
        }
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

    /// The state of the shared level; `None` when none is configured.
    pub fn shared_cache_status(&self) -> Option<SharedCacheStatus> {
        self.inner.shared.as_ref().map(|shared| shared.status())
    }

    /// Whether the shared level works (calls and invalidations); `None` when none is configured.
    pub fn shared_cache_healthy(&self) -> Option<bool> {
        self.shared_cache_status().map(|status| status.healthy())
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
        Arc::clone(
            upstreams
                .entry(id)
                .or_insert_with(|| Arc::new(Upstream::new(environment.max_concurrent_fetches))),
        )
    }

    /// The rate-limit headers last seen from `environment`'s IdP client.
    pub fn rate_limit(&self, environment: &EnvironmentSettings) -> crate::idp::RateLimitHeaders {
        self.upstream(environment).rate_limit()
    }

    /// Forgets remembered rejections (after a reload that may have fixed credentials).
    pub fn forget_rejections(&self) {
        self.inner.rejections.invalidate_all();
    }

    /// One token for a miss or a refresh: from the shared level when it has a good one, else
    /// from the IdP by one replica at a time (see the module docs).
    async fn fetch(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        wanted: Wanted,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        let Some(shared) = self.inner.shared.as_deref() else {
            return self.fetch_from_idp(environment, key).await.map(Arc::new);
        };
        let shared_key = SharedKey::new(environment, key);
        let deadline = Instant::now() + self.inner.wait_for_peer;
        loop {
            match self.load_shared(shared, &shared_key, wanted).await {
                Ok(Some(token)) => return Ok(token),
                Ok(None) => {}
                Err(_) => break,
            }
            match shared.try_lock(&shared_key).await {
                Ok(Some(lock)) => {
                    let fetched = self
                        .fetch_locked(shared, &shared_key, environment, key, wanted)
                        .await;
                    let _ = shared.unlock(&shared_key, lock).await;
                    return fetched;
                }
                Ok(None) => {}
                Err(_) => break,
            }
            if Instant::now() + PEER_POLL_INTERVAL >= deadline {
                tracing::warn!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    "another replica's token request outlasted shared_cache.wait_for_peer; asking the IdP"
                );
                break;
            }
            tokio::time::sleep(PEER_POLL_INTERVAL).await;
        }
        // The shared level failed or the peer is too slow: fetch, and share if still possible.
        let token = Arc::new(
            self.fetch_from_idp(environment, key)
                .await?
                .with_shared_key(shared_key),
        );
        self.store_shared(shared, &shared_key, &token).await;
        Ok(token)
    }

    /// The IdP request of the replica that holds the lock of `shared_key`.
    async fn fetch_locked(
        &self,
        shared: &dyn SharedCache,
        shared_key: &SharedKey,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        wanted: Wanted,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        // Another replica may have stored its token and let go of the lock since the last look.
        if let Ok(Some(token)) = self.load_shared(shared, shared_key, wanted).await {
            return Ok(token);
        }
        let token = Arc::new(
            self.fetch_from_idp(environment, key)
                .await?
                .with_shared_key(*shared_key),
        );
        self.store_shared(shared, shared_key, &token).await;
        Ok(token)
    }

    /// The token the shared level holds for `shared_key`, if it is what the fetch wants.
    async fn load_shared(
        &self,
        shared: &dyn SharedCache,
        shared_key: &SharedKey,
        wanted: Wanted,
    ) -> Result<Option<Arc<CachedToken>>, SharedCacheError> {
        let Some(stored) = shared.load(shared_key).await? else {
            return Ok(None);
        };
        let remaining = stored.remaining(SystemTime::now());
        let usable = match wanted {
            Wanted::Remaining(required) => remaining >= required,
            Wanted::FetchedAfter(after) => {
                stored.fetched_at > after && remaining >= self.inner.settings.min_remaining
            }
        };
        Ok(usable.then(|| {
            Arc::new(
                CachedToken::new(
                    stored.issued,
                    stored.fetched_at,
                    self.inner.settings.refresh_ahead,
                    rand::rng().random(),
                )
                .with_shared_key(*shared_key),
            )
        }))
    }

    /// Stores a fetched token in the shared level for as long as it may be handed out.
    async fn store_shared(
        &self,
        shared: &dyn SharedCache,
        shared_key: &SharedKey,
        token: &CachedToken,
    ) {
        let ttl = token
            .remaining(SystemTime::now())
            .saturating_sub(self.inner.settings.min_remaining);
        if !ttl.is_zero() {
            let _ = shared.store(shared_key, token, ttl).await;
        }
    }

    /// One token from the IdP, with the failure policy applied (see the module docs).
    async fn fetch_from_idp(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
    ) -> Result<CachedToken, BrokerError> {
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
                    return Ok(CachedToken::new(
                        fetched.token,
                        SystemTime::now(),
                        self.inner.settings.refresh_ahead,
                        rand::rng().random(),
                    ));
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

    /// Starts one background refresh of `key`, whose current token was fetched at `current`;
    /// that token keeps being served meanwhile. A newer token another replica already fetched
    /// serves as the refresh.
    fn spawn_refresh(
        &self,
        environment: Arc<EnvironmentSettings>,
        key: TokenKey,
        current: SystemTime,
    ) {
        self.inner
            .metrics
            .cache_refresh(&environment.tenant, &environment.environment);
        let broker = self.clone();
        tokio::spawn(async move {
            match broker
                .fetch(&environment, &key, Wanted::FetchedAfter(current))
                .await
            {
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

    /// Applies the other replicas' changes to this cache until the broker is dropped (noticed
    /// within a second; dropping the receiver then ends the subscription).
    fn spawn_invalidations(&self, mut events: mpsc::Receiver<Invalidation>) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let received = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                match received {
                    Ok(Some(event)) => Broker { inner }.apply(event).await,
                    Ok(None) => return,
                    Err(_) => {}
                }
            }
        });
    }

    /// Applies one change another replica made: drop a forgotten token, or replace an older
    /// token with the newer one from the shared level. Entries are found by their shared key, a
    /// scan that only runs for announcements (about one per key per token lifetime).
    async fn apply(&self, event: Invalidation) {
        let (Invalidation::Stored {
            key: shared_key, ..
        }
        | Invalidation::Deleted {
            key: shared_key, ..
        }) = &event;
        let keys: Vec<Arc<TokenKey>> = self
            .inner
            .tokens
            .iter()
            .filter(|(_, token)| token.shared_key() == Some(shared_key))
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            match &event {
                Invalidation::Deleted { token: None, .. } => {
                    self.inner.tokens.invalidate(&*key).await;
                }
                Invalidation::Deleted {
                    token: Some(digest),
                    ..
                } => {
                    self.inner
                        .tokens
                        .entry_by_ref(&*key)
                        .and_compute_with(|entry| async move {
                            match entry {
                                Some(entry) if entry.value().digest() == *digest => Op::Remove,
                                _ => Op::Nop,
                            }
                        })
                        .await;
                }
                Invalidation::Stored { token: digest, .. } => {
                    self.replace_with_shared(&key, shared_key, digest).await;
                }
            }
        }
    }

    /// Replaces the cached token of `key` with the newer one another replica stored.
    async fn replace_with_shared(
        &self,
        key: &TokenKey,
        shared_key: &SharedKey,
        stored: &TokenDigest,
    ) {
        let Some(shared) = self.inner.shared.as_deref() else {
            return;
        };
        let Some(current) = self.inner.tokens.get(key).await else {
            return;
        };
        if current.digest() == *stored {
            return;
        }
        let wanted = Wanted::FetchedAfter(current.fetched_at);
        let Ok(Some(newer)) = self.load_shared(shared, shared_key, wanted).await else {
            return;
        };
        self.inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if entry.value().fetched_at < newer.fetched_at => Op::Put(newer),
                    _ => Op::Nop,
                }
            })
            .await;
    }
}
