//! The broker: tokens from cache or from the IdP, once per key.
//!
//! [`Broker::get`] is the heart of the service. A hit is a moka lookup and a pre-serialised body.
//! A miss goes through moka's `try_get_with`, so N concurrent misses on one key make exactly one
//! IdP request and every waiter receives its result, success or error (errors are shared, never
//! cached). Entries expire individually at `expires_at - min_remaining`, so a token with less
//! validity than that is never handed out. In the last `refresh_ahead` part of a token's life the
//! first request starts one background refresh and is served the current token at once.
//!
//! This module knows nothing about HTTP routes; `api` maps [`BrokerError`] to responses.

mod key;
mod token;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use rand::Rng as _;

use crate::config::{CacheSettings, EnvironmentSettings};
use crate::idp::{IdpClient, IdpError};

pub use key::{ScopeSet, TokenKey};
pub use token::CachedToken;

/// How long callers are asked to wait after a transient IdP failure.
const RETRY_AFTER_TRANSIENT: Duration = Duration::from_secs(1);
/// How long callers are asked to wait after a 429 that did not say.
const RETRY_AFTER_RATE_LIMITED: Duration = Duration::from_secs(10);

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
    idp: IdpClient,
    settings: CacheSettings,
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
    /// Builds an empty broker.
    pub fn new(settings: CacheSettings, idp: IdpClient) -> Self {
        let tokens = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(TokenExpiry {
                min_remaining: settings.min_remaining,
            })
            .build();
        Self {
            inner: Arc::new(Inner {
                tokens,
                idp,
                settings,
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
                if now >= token.refresh_at && token.claim_refresh() {
                    self.spawn_refresh(Arc::clone(environment), key.clone());
                }
                return Ok(Lease {
                    token,
                    status: CacheStatus::Hit,
                });
            }
            self.forget_entry(key, &token).await;
        }

        // A token that another request cached between our lookup and here may still fall short
        // of `required`; forget it and fetch again, a bounded number of times. A token fetched
        // after this request began is as fresh as any can be, so its whole lifetime counts.
        let started = SystemTime::now();
        let mut lifetime = Duration::ZERO;
        for _ in 0..3 {
            let token = self
                .inner
                .tokens
                .try_get_with_by_ref(key, self.fetch(environment, key))
                .await?;
            lifetime = token.lifetime();
            let fresh = token.fetched_at >= started;
            if token.remaining(SystemTime::now()) >= required || (fresh && lifetime >= required) {
                token.record_hit();
                return Ok(Lease {
                    token,
                    status: CacheStatus::Miss,
                });
            }
            self.forget_entry(key, &token).await;
            if fresh {
                break;
            }
        }
        Err(Arc::new(if lifetime < min_remaining {
            BrokerError::LifetimeBelowMinimum {
                lifetime,
                min_remaining,
            }
        } else {
            BrokerError::MinTtlTooLong { required, lifetime }
        }))
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

    async fn fetch(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        let fetched = self
            .inner
            .idp
            .fetch(environment, &key.audience, key.scope.as_str())
            .await
            .inspect_err(|error| {
                tracing::warn!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    error = %error,
                    "token request failed"
                );
            })?;
        tracing::info!(
            tenant = %key.tenant,
            environment = %key.environment,
            lifetime_s = fetched.token.lifetime.as_secs(),
            "fetched a token from the IdP"
        );
        Ok(Arc::new(CachedToken::new(
            fetched.token,
            SystemTime::now(),
            self.inner.settings.refresh_ahead,
            rand::rng().random(),
        )))
    }

    /// Starts one background refresh of `key`; the current token keeps being served meanwhile.
    fn spawn_refresh(&self, environment: Arc<EnvironmentSettings>, key: TokenKey) {
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
