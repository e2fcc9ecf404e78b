//! Replicas and the shared level (docs/design.md, "Shared cache across replicas"): a miss looks in
//! the shared level before the IdP, one replica per key takes the fetch lock, the others wait for
//! its token, and every replica applies the others' announcements to its own cache.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use moka::ops::compute::{CompResult, Op};
use rand::Rng as _;
use tokio::sync::mpsc;

use super::{Broker, BrokerError, KeyHasher, SharedCache, lock};
use crate::idp::EnvironmentSettings;
use crate::token::{
    CachedToken, Invalidation, LockToken, SharedCacheError, SharedEntry, SharedKey, TokenDigest,
    TokenKey,
};

/// How long a check after a new subscription waits for the level to take calls.
const RESYNC_WAIT: Duration = Duration::from_secs(10);

/// How often a replica looks for the token another replica is fetching.
const PEER_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The cached keys by their shared key (only tokens that have one, with a shared level): how an
/// announcement, which names a token by its shared key alone, finds the entry it is about.
/// Entries are added when a token is installed and removed when moka drops it.
#[derive(Default)]
pub(super) struct SharedIndex(Mutex<HashMap<SharedKey, TokenKey, KeyHasher>>);

impl SharedIndex {
    /// Indexes `key`, whose cached token is `token`.
    pub(super) fn insert(&self, key: &TokenKey, token: &CachedToken) {
        if let Some(shared_key) = token.shared_key() {
            lock(&self.0).insert(*shared_key, key.clone());
        }
    }

    /// Forgets `key`, whose token `token` left the cache (unless another key took its place).
    pub(super) fn remove(&self, token: &CachedToken, key: &TokenKey) {
        if let Some(shared_key) = token.shared_key() {
            let mut index = lock(&self.0);
            if index.get(shared_key) == Some(key) {
                index.remove(shared_key);
            }
        }
    }

    /// The key cached under `shared_key`, if any.
    pub(super) fn get(&self, shared_key: &SharedKey) -> Option<TokenKey> {
        lock(&self.0).get(shared_key).cloned()
    }
}

/// Which token from the shared level can serve a fetch.
#[derive(Clone, Copy)]
pub(super) enum Wanted {
    /// One with at least this much validity left (a miss, or a caller who needs more).
    Remaining(Duration),
    /// One fetched after this instant (a refresh, which another replica may have made already).
    FetchedAfter(SystemTime),
}

/// The cross-replica fetch lock of one key while this replica holds it. Released when the fetch
/// ends, however it ends: explicitly, or (if the fetch task dies) by a release spawned on drop,
/// so the other replicas never wait out `lock_ttl` for a fetch that is gone.
struct HeldLock {
    shared: Arc<dyn SharedCache>,
    key: SharedKey,
    lock: Option<LockToken>,
}

impl HeldLock {
    async fn release(mut self) {
        if let Some(lock) = self.lock.take() {
            let _ = self.shared.unlock(&self.key, lock).await;
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let Some(lock) = self.lock.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (shared, key) = (Arc::clone(&self.shared), self.key);
            runtime.spawn(async move {
                let _ = shared.unlock(&key, lock).await;
            });
        }
    }
}

impl Wanted {
    /// Whether a token with `remaining` validity, fetched at `fetched_at`, serves this fetch.
    pub(super) fn accepts(
        self,
        fetched_at: SystemTime,
        remaining: Duration,
        min_remaining: Duration,
    ) -> bool {
        match self {
            Self::Remaining(required) => remaining >= required,
            Self::FetchedAfter(after) => fetched_at > after && remaining >= min_remaining,
        }
    }
}

impl Broker {
    /// One token for a miss or a refresh: from the shared level when it has a good one, else
    /// from the IdP by one replica at a time (see the module docs). `asked` is set once an IdP
    /// request is sent.
    pub(super) async fn fetch(
        &self,
        environment: &EnvironmentSettings,
        key: &TokenKey,
        wanted: Wanted,
        asked: &AtomicBool,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        let Some(shared) = self.inner.shared.clone() else {
            return self
                .fetch_from_idp(environment, key, asked)
                .await
                .map(Arc::new);
        };
        let shared_key = SharedKey::new(environment, key);
        let deadline = self.inner.clock.instant() + self.inner.wait_for_peer;
        loop {
            match self.load_shared(&*shared, &shared_key, wanted).await {
                Ok(Some(token)) => return Ok(token),
                Ok(None) => {}
                Err(_) => break,
            }
            match shared.try_lock(&shared_key).await {
                Ok(Some(lock)) => {
                    let held = HeldLock {
                        shared: Arc::clone(&shared),
                        key: shared_key,
                        lock: Some(lock),
                    };
                    let fetched = self
                        .fetch_locked(&*shared, &shared_key, environment, key, wanted, asked)
                        .await;
                    held.release().await;
                    return fetched;
                }
                Ok(None) => {}
                Err(_) => break,
            }
            // The last look and the last try at the lock happen at the deadline itself.
            let now = self.inner.clock.instant();
            if now >= deadline {
                tracing::warn!(
                    tenant = %key.tenant,
                    environment = %key.environment,
                    "another replica's token request outlasted shared_cache.wait_for_peer; asking the IdP"
                );
                break;
            }
            tokio::time::sleep(PEER_POLL_INTERVAL.min(deadline - now)).await;
        }
        // The shared level failed or the peer is too slow: fetch, and share if still possible.
        let token = Arc::new(
            self.fetch_from_idp(environment, key, asked)
                .await?
                .with_shared_key(shared_key),
        );
        self.store_shared(&*shared, &shared_key, &token).await;
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
        asked: &AtomicBool,
    ) -> Result<Arc<CachedToken>, BrokerError> {
        // Another replica may have stored its token and let go of the lock since the last look.
        if let Ok(Some(token)) = self.load_shared(shared, shared_key, wanted).await {
            return Ok(token);
        }
        let token = Arc::new(
            self.fetch_from_idp(environment, key, asked)
                .await?
                .with_shared_key(*shared_key),
        );
        self.store_shared(shared, shared_key, &token).await;
        Ok(token)
    }

    /// The token the shared level holds for `shared_key`, if it is what the fetch wants.
    pub(super) async fn load_shared(
        &self,
        shared: &dyn SharedCache,
        shared_key: &SharedKey,
        wanted: Wanted,
    ) -> Result<Option<Arc<CachedToken>>, SharedCacheError> {
        let Some(stored) = shared.load(shared_key).await? else {
            return Ok(None);
        };
        let remaining = stored.remaining(self.inner.clock.now());
        let min_remaining = self.inner.settings.min_remaining;
        let usable = wanted.accepts(stored.fetched_at, remaining, min_remaining);
        Ok(usable.then(|| {
            Arc::new(
                CachedToken::new(
                    stored.issued,
                    stored.fetched_at,
                    self.inner.settings.refresh_ahead,
                    min_remaining,
                    rand::rng().random(),
                )
                .with_shared_key(*shared_key),
            )
        }))
    }

    /// Stores a fetched token in the shared level for as long as it may be handed out.
    pub(super) async fn store_shared(
        &self,
        shared: &dyn SharedCache,
        shared_key: &SharedKey,
        token: &CachedToken,
    ) {
        let ttl = token
            .remaining(self.inner.clock.now())
            .saturating_sub(self.inner.settings.min_remaining);
        if !ttl.is_zero() {
            let _ = shared.store(shared_key, token, ttl).await;
        }
    }

    /// Applies the other replicas' changes to this cache until the broker is dropped (noticed
    /// within a second; dropping the receiver then ends the subscription).
    pub(super) fn spawn_invalidations(&self, mut events: mpsc::Receiver<Invalidation>) {
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
    /// token with the newer one from the shared level. The entry is found by its shared key in
    /// [`SharedIndex`], whatever the size of the cache; an announcement of a key this replica
    /// does not hold costs one look-up.
    pub(super) async fn apply(&self, event: Invalidation) {
        if let Invalidation::SecretChanged { key } = &event {
            return self.reread_secret(key).await;
        }
        let (Invalidation::Stored {
            key: shared_key, ..
        }
        | Invalidation::Deleted {
            key: shared_key, ..
        }) = &event
        else {
            return self.resync().await;
        };
        let Some(key) = self.inner.by_shared_key.get(shared_key) else {
            return;
        };
        // The index may still name a key whose token changed identity (a reload changed how it
        // talks to its IdP): each change below acts only on a token of this shared key.
        match &event {
            Invalidation::Deleted { token: only, .. } => {
                self.apply_delete(&key, shared_key, *only).await;
            }
            Invalidation::Stored { token: digest, .. } => {
                self.replace_with_shared(&key, shared_key, digest).await;
            }
            Invalidation::SecretChanged { .. } | Invalidation::Resubscribed => {}
        }
    }

    /// Checks every cached token that has a shared key against the level, after a (re)made
    /// subscription, so that changes announced while this replica was not listening do not
    /// linger until expiry: a token a `DELETE` forgot there is forgotten here as an announced
    /// `DELETE` would forget it, and a different token stored there replaces this one. A token
    /// the level lacks is left alone (it is never written back: it may be one a `DELETE` forgot).
    /// It runs in the announcement loop, so it and the announcements apply in order, and reads
    /// the level in batches. A subscription can come back before calls do (the health probe
    /// marks the level up within a second), so it waits for that, up to [`RESYNC_WAIT`]; it
    /// stops at a failing call, and the next subscription checks again.
    async fn resync(&self) {
        let Some(shared) = self.inner.shared.as_deref() else {
            return;
        };
        let deadline = self.inner.clock.instant() + RESYNC_WAIT;
        while !shared.status().up {
            if self.inner.clock.instant() >= deadline {
                return;
            }
            tokio::time::sleep(PEER_POLL_INTERVAL * 5).await;
        }
        for key in self.known_secrets() {
            self.reread_secret(&key).await;
        }
        let cached: Vec<(Arc<TokenKey>, SharedKey, TokenDigest)> = self
            .inner
            .tokens
            .iter()
            .filter_map(|(key, token)| Some((key, *token.shared_key()?, token.digest())))
            .collect();
        let shared_keys: Vec<SharedKey> = cached.iter().map(|(_, key, _)| *key).collect();
        let Ok(entries) = shared.entries(&shared_keys).await else {
            return;
        };
        for ((key, shared_key, digest), entry) in cached.iter().zip(entries) {
            match entry {
                SharedEntry::Stored(stored) if stored != *digest => {
                    self.replace_with_shared(key, shared_key, &stored).await;
                }
                SharedEntry::Deleted(None) => self.apply_delete(key, shared_key, None).await,
                SharedEntry::Deleted(Some(deleted)) if deleted == *digest => {
                    self.apply_delete(key, shared_key, Some(deleted)).await;
                }
                SharedEntry::Stored(_) | SharedEntry::Deleted(Some(_)) | SharedEntry::Absent => {}
            }
        }
    }

    /// Applies another replica's `DELETE` of `key` (only to a token of `shared_key`, and only
    /// where it holds the token of digest `only`, when given) as a local one would: within `cache.min_refetch_interval` of the
    /// token's fetch it is marked, else forgotten. So a caller cannot turn `DELETE` on one replica
    /// and `GET` on another into an IdP request per loop.
    async fn apply_delete(
        &self,
        key: &TokenKey,
        shared_key: &SharedKey,
        only: Option<TokenDigest>,
    ) {
        let interval = self.inner.settings.min_refetch_interval;
        self.remove_if(key, |token| {
            if token.shared_key() != Some(shared_key)
                || only.is_some_and(|digest| token.digest() != digest)
            {
                return false;
            }
            if token.within_refetch_interval(self.inner.clock.now(), interval) {
                token.request_refetch();
                return false;
            }
            true
        })
        .await;
    }

    /// Replaces the cached token of `key` with the newer one another replica stored.
    pub(super) async fn replace_with_shared(
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
        if current.digest() == *stored || current.shared_key() != Some(shared_key) {
            return;
        }
        let wanted = Wanted::FetchedAfter(current.fetched_at);
        let Ok(Some(newer)) = self.load_shared(shared, shared_key, wanted).await else {
            return;
        };
        let replaced = self
            .inner
            .tokens
            .entry_by_ref(key)
            .and_compute_with(|entry| async move {
                match entry {
                    Some(entry) if entry.value().fetched_at < newer.fetched_at => {
                        if let Some(owner) = entry.value().owner() {
                            newer.set_owner(Arc::clone(owner));
                        }
                        Op::Put(newer)
                    }
                    _ => Op::Nop,
                }
            })
            .await;
        if let CompResult::ReplacedWith(entry) = replaced {
            self.inner.by_shared_key.insert(key, entry.value());
        }
    }
}
