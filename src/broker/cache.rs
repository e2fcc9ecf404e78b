//! The cache and its leases (docs/design.md, "Cache"): a hit is a moka lookup and a
//! pre-built body; anything else is one flight per key ([`super::flight`]). Each entry expires
//! `min_remaining` before its token does, and refreshes in the background inside its servable
//! life. What the broker learns is kept: the cached token tells how long the key's tokens live (a
//! `min_ttl` above that is refused without asking the IdP), and a `DELETE` within `min_refetch_interval` of the key's last fetch
//! marks the entry rather than forgetting it, so no caller can turn `DELETE` + `GET` into an IdP
//! request per loop.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

use super::flight::Starter;
use super::replicas::Wanted;
use super::{
    Broker, BrokerError, CacheStatus, CachedToken, Lease, SharedKey, TokenDigest, TokenKey, lock,
};
use crate::clock::Clock;
use crate::idp::EnvironmentSettings;
use crate::limits::IdpBudget;
use crate::token::{SharedEntry, TokenMemo};

/// What a `DELETE` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgot {
    /// The cached token is gone; the next request fetches a new one.
    Forgotten,
    /// The token was fetched less than `cache.min_refetch_interval` ago: it keeps serving, and
    /// the first request after the interval fetches a new one.
    Marked,
    /// No token of the key was cached here.
    NothingCached,
    /// A compare-and-delete whose token is not the cached one: nothing changed.
    NotMatched,
}

impl Forgot {
    /// `forgotten`, `marked`, `nothing_cached` or `not_matched`, for the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forgotten => "forgotten",
            Self::Marked => "marked",
            Self::NothingCached => "nothing_cached",
            Self::NotMatched => "not_matched",
        }
    }
}

/// Per-entry expiry: an entry leaves the cache `min_remaining` before its token expires.
pub(super) struct TokenExpiry {
    pub(super) min_remaining: Duration,
    /// The broker's clock (moka's own timer still decides when the entry leaves).
    pub(super) clock: Clock,
}

impl TokenExpiry {
    fn time_to_live(&self, token: &CachedToken) -> Option<Duration> {
        Some(
            token
                .remaining(self.clock.now())
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
    /// A token for `key` with at least `max(min_ttl, cache.min_remaining)` of validity left. A
    /// request that needs an IdP request and starts it is charged to `budget`. With `memo` (a
    /// kept grant's), the token a lookup found for it within the last second, and not retired
    /// since, is taken without a lookup; a lookup's hit is remembered there.
    pub async fn get(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        min_ttl: Option<Duration>,
        budget: &Arc<IdpBudget>,
        memo: Option<&TokenMemo>,
    ) -> Result<Lease, Arc<BrokerError>> {
        let settings = &self.inner.settings;
        let min_remaining = settings.min_remaining;
        let required = min_ttl.map_or(min_remaining, |ttl| ttl.max(min_remaining));

        let recalled = memo.and_then(|memo| {
            let now = self.inner.clock.now();
            memo.recall(now).map(|token| (token, now))
        });
        let looked_up = recalled.is_none();
        let (cached, now) = match recalled {
            Some((token, now)) => (Some(token), now),
            None => {
                let cached = self.inner.tokens.get(key).await;
                (cached, self.inner.clock.now())
            }
        };
        if let Some(token) = &cached
            && token.remaining(now) >= required
            && !token.refetch_due(now, settings.min_refetch_interval)
        {
            if looked_up && let Some(memo) = memo {
                memo.remember(token, now);
            }
            token.record_hit();
            self.inner.metrics.cache_hit(
                &environment.metrics,
                &environment.tenant,
                &environment.environment,
            );
            if now >= token.refresh_at && token.refresh_allowed(now) && token.claim_refresh() {
                self.start_refresh(environment, key, token);
            }
            return Ok(Lease {
                token: Arc::clone(token),
                status: CacheStatus::Hit,
                at: now,
            });
        }

        // Nothing cached, too short for this caller, or a refetch a DELETE asked for. Boxed, so
        // that the future of a hit, which every token request's handler holds, stays small.
        let answer = Box::pin(self.get_uncached(environment, key, cached, required, budget)).await;
        // A hit when the shared level had the token (nothing waited on the IdP), else a miss.
        match &answer {
            Ok(Lease {
                status: CacheStatus::Hit,
                ..
            }) => self.inner.metrics.cache_hit(
                &environment.metrics,
                &environment.tenant,
                &environment.environment,
            ),
            _ => self
                .inner
                .metrics
                .cache_miss(&environment.tenant, &environment.environment),
        }
        answer
    }

    /// [`Broker::get`] when this replica's cache cannot answer at once.
    async fn get_uncached(
        &self,
        environment: &Arc<EnvironmentSettings>,
        key: &TokenKey,
        cached: Option<Arc<CachedToken>>,
        required: Duration,
        budget: &Arc<IdpBudget>,
    ) -> Result<Lease, Arc<BrokerError>> {
        let settings = &self.inner.settings;
        let min_remaining = settings.min_remaining;
        // The cached token says how long this key's tokens live: a min_ttl above that is refused
        // without asking the IdP for another token just as short.
        if required > min_remaining
            && let Some(token) = &cached
            && required > token.lifetime()
        {
            let lifetime = token.lifetime();
            return Err(Arc::new(BrokerError::MinTtlTooLong { required, lifetime }));
        }
        // A token fetched moments ago that is too short for this caller is not replaced before
        // `min_refetch_interval`: a min_ttl just under the lifetime cannot make a fetch a second.
        let now = self.inner.clock.now();
        if let Some(token) = &cached
            && token.remaining(now) < required
            && token.within_refetch_interval(now, settings.min_refetch_interval)
        {
            let since = now.duration_since(token.fetched_at).unwrap_or_default();
            return Err(Arc::new(BrokerError::RefetchTooSoon {
                required,
                retry_after: settings.min_refetch_interval.saturating_sub(since),
            }));
        }
        // What the IdP answered recently is answered again, before any budget is charged.
        if let Some(remembered) = self.recalled(key).await {
            return Err(Arc::new(self.remembered_error(remembered)));
        }
        let mut wanted = match &cached {
            Some(token)
                if token.refetch_due(self.inner.clock.now(), settings.min_refetch_interval) =>
            {
                Wanted::FetchedAfter(token.fetched_at)
            }
            _ => Wanted::Remaining(required),
        };
        let mut new_key = cached.is_none();
        // At most twice: a flight another caller started for less validity may land a token too
        // short for this one, which then starts its own.
        for _ in 0..2 {
            let started = self.inner.clock.now();
            let starter = Starter { budget, new_key };
            let token = self.fly(environment, key, wanted, starter).await?;
            if let Some(lease) = lease(token, required, started, self.inner.clock.now())? {
                return Ok(lease);
            }
            wanted = Wanted::Remaining(required);
            new_key = false;
        }
        Err(Arc::new(BrokerError::Internal))
    }

    /// Forgets the cached token of `key` (only if it is still `only`, for a compare-and-delete),
    /// on every replica; within `cache.min_refetch_interval` of the key's last fetch it marks the
    /// entry instead (see [`Forgot::Marked`]). The shared level is written (a tombstone, and an
    /// announcement every replica reads) only for a token this replica or the level holds, and
    /// that write is charged to `budget`: a loop of `DELETE`s of made-up keys writes nothing,
    /// and one of real keys is bounded by the caller's `idp_requests_per_minute`.
    pub async fn forget(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        only: Option<&str>,
        budget: &IdpBudget,
    ) -> Result<Forgot, BrokerError> {
        let current = self.inner.tokens.get(key).await;
        let matches = |token: &CachedToken| only.is_none_or(|only| token.is(only));
        if let Some(token) = &current
            && matches(token)
            && token.within_refetch_interval(
                self.inner.clock.now(),
                self.inner.settings.min_refetch_interval,
            )
        {
            token.request_refetch();
            return Ok(Forgot::Marked);
        }
        if let Some(shared) = &self.inner.shared {
            // The shared level first: a miss here in between must not find the old token there.
            let digest = only.map(TokenDigest::of);
            let shared_key = SharedKey::new(environment, key);
            let held_here = current.as_deref().is_some_and(matches);
            let held_there = !held_here
                && matches!(
                    shared.entries(std::slice::from_ref(&shared_key)).await.as_deref(),
                    Ok([SharedEntry::Stored(stored)]) if digest.is_none_or(|only| only == *stored)
                );
            if held_here || held_there {
                if let Err(retry_after) = budget.spend(self.inner.clock.instant()) {
                    budget.record_refused_budget();
                    return Err(BrokerError::CallerOverBudget { retry_after });
                }
                let _ = shared.delete(&shared_key, digest).await;
            }
        }
        let Some(token) = current else {
            return Ok(Forgot::NothingCached);
        };
        if !matches(&token) {
            return Ok(Forgot::NotMatched);
        }
        Ok(match self.remove_if(key, matches).await {
            true => Forgot::Forgotten,
            false if only.is_some() => Forgot::NotMatched,
            false => Forgot::NothingCached,
        })
    }

    /// Forgets everything learnt about the given environments, as after a reload that changed
    /// how they talk to their IdP (`changed`, their settings before it): cached tokens (and with
    /// them the lifetimes they teach), remembered rejections, and the IdP client's pause after a
    /// 429. Fetches under
    /// way for them, or started later with settings older than `generation`, are not installed.
    pub fn forget_environments(&self, changed: &[Arc<EnvironmentSettings>], generation: u64) {
        if changed.is_empty() {
            return;
        }
        {
            let mut generations = lock(&self.inner.generations);
            for environment in changed {
                let name = (
                    Arc::clone(&environment.tenant),
                    Arc::clone(&environment.environment),
                );
                let current = generations.entry(name).or_insert(0);
                *current = (*current).max(generation);
            }
        }
        let names: HashSet<(Arc<str>, Arc<str>)> = changed
            .iter()
            .map(|e| (e.tenant.clone(), e.environment.clone()))
            .collect();
        let names = Arc::new(names);
        let of_changed = move |key: &TokenKey| {
            names.contains(&(Arc::clone(&key.tenant), Arc::clone(&key.environment)))
        };
        self.inner.flights.detach(&of_changed);
        let (tokens, rejections) = (of_changed.clone(), of_changed);
        let invalidated = [
            self.inner
                .tokens
                .invalidate_entries_if(move |key, _| tokens(key))
                .map(drop),
            self.inner
                .rejections
                .invalidate_entries_if(move |key, _| rejections(key))
                .map(drop),
        ];
        for error in invalidated.into_iter().filter_map(Result::err) {
            tracing::error!(%error, "cannot forget the cached state of changed environments");
        }
        for environment in changed {
            self.forget_upstream(environment);
        }
    }

    /// Forgets remembered rejections of every key (after a reload, which may have fixed
    /// credentials or changed what the IdP issues).
    pub fn forget_remembered(&self) {
        self.inner
            .reloads
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.inner.rejections.invalidate_all();
    }

    /// Removes `stale` from the cache if it is still the token of `key`.
    pub(super) async fn forget_entry(&self, key: &TokenKey, stale: &Arc<CachedToken>) {
        self.remove_if(key, |token| std::ptr::eq(token, &**stale))
            .await;
    }

    /// Removes the token of `key` if `remove` says so (it sees the entry under the key's lock,
    /// so it may also mark it), giving its `max_keys` slot back at once; true when removed.
    pub(super) async fn remove_if(
        &self,
        key: &TokenKey,
        remove: impl FnOnce(&CachedToken) -> bool,
    ) -> bool {
        let removed = self
            .inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if remove(entry.value()) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
        match removed {
            CompResult::Removed(entry) => {
                release_slot(entry.value());
                true
            }
            _ => false,
        }
    }
}

/// Gives back the `max_keys` slot of a token whose key was forgotten, without waiting for the
/// cache to drop it.
pub(super) fn release_slot(token: &CachedToken) {
    if let Some(slot) = token.owner() {
        slot.release();
    }
}

/// Leases a token that a flight landed: `None` when it is an older token (found cached or in the
/// shared level) too short for this request, which should then fly again.
fn lease(
    token: Arc<CachedToken>,
    required: Duration,
    started: SystemTime,
    now: SystemTime,
) -> Result<Option<Lease>, Arc<BrokerError>> {
    // A token fetched after this request began is as fresh as any can be, so its whole
    // lifetime counts; `expires_in` then shows the fraction of a second already gone. Such a
    // request waited on an IdP request (its own, or another caller's or replica's): a miss.
    // An older one was already there (found in the shared level, say): a hit.
    let fresh = token.fetched_at >= started;
    if token.serves(now, required, started) {
        token.record_hit();
        let status = if fresh {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        return Ok(Some(Lease {
            token,
            status,
            at: now,
        }));
    }
    if fresh {
        let lifetime = token.lifetime();
        return Err(Arc::new(BrokerError::MinTtlTooLong { required, lifetime }));
    }
    Ok(None)
}
