//! The cache and its leases: a hit is a moka lookup, a miss one single-flight fetch, and each
//! entry expires `min_remaining` before its token does (DESIGN.md, "Cache semantics").

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

use super::replicas::Wanted;
use super::{
    Broker, BrokerError, CacheStatus, CachedToken, Lease, SharedKey, TokenDigest, TokenKey,
};
use crate::idp::EnvironmentSettings;

/// Per-entry expiry: an entry leaves the cache `min_remaining` before its token expires.
pub(super) struct TokenExpiry {
    pub(super) min_remaining: Duration,
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
    pub(super) async fn replace_short(
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
    pub(super) async fn lease_fresh(
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

    pub(super) async fn forget_entry(&self, key: &TokenKey, stale: &Arc<CachedToken>) {
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

    /// Starts one background refresh of `key`, whose current token was fetched at `current`;
    /// that token keeps being served meanwhile. A newer token another replica already fetched
    /// serves as the refresh.
    pub(super) fn spawn_refresh(
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
}
