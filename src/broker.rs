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
//! The parts follow docs/design.md's sections: `cache` (lookups, leases, expiry, forgetting),
//! `failure` (the failure policy and per-IdP state in `upstream`), `replicas` (the shared level),
//! `rotation` and `rotated` (client secrets the broker rotates, and the one in force),
//! [`error`]'s [`BrokerError`]. Each holds an `impl Broker` block over the private state here.
//! This module knows nothing about HTTP routes; `api` maps [`BrokerError`] to responses.

mod cache;
mod credential;
pub mod error;
mod failure;
mod flight;
mod replicas;
mod rotated;
mod rotation;
mod settings;
mod shared;
mod upstream;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::clock::Clock;
use crate::idp::IdpClient;
use crate::telemetry::metrics::Metrics;

use cache::TokenExpiry;
use failure::Remembered;
use flight::Flights;
use replicas::SharedIndex;
use rotated::KnownSecrets;
use rotation::Rotations;

pub use cache::Forgot;
pub use error::BrokerError;
pub use failure::{IdpPermit, idp_outcome};
pub use rotation::RotationError;
pub use settings::CacheSettings;
pub use shared::SharedCache;
pub use upstream::Upstream;

use crate::token::{
    CacheStatus, CachedToken, Lease, SharedCacheStatus, SharedKey, TokenDigest, TokenKey,
};

/// (tenant, environment), as in a [`TokenKey`].
type EnvironmentName = (Arc<str>, Arc<str>);

/// Locks a std mutex that guards a few instructions of bookkeeping (never held across an await);
/// a panic elsewhere cannot leave that state inconsistent, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The hasher of cache keys: foldhash, randomly seeded per process, in place of SipHash (keys are
/// short strings, hashed on every hit).
type KeyHasher = foldhash::quality::RandomState;

/// Fetches, caches and refreshes tokens; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    tokens: Cache<TokenKey, Arc<CachedToken>, KeyHasher>,
    /// The cached keys by shared key, so that another replica's announcement finds its entry
    /// without a scan of the cache.
    by_shared_key: Arc<SharedIndex>,
    /// What the IdP answered recently per key that is not worth asking again: a rejection, or a
    /// token too short to serve. Forgotten after `cache.negative_ttl`.
    rejections: Cache<TokenKey, (Remembered, Instant), KeyHasher>,
    /// The fetches under way, one per key, each owned by the broker (not by a request).
    flights: Flights,
    /// Per (tenant, environment): bumped when a reload changes how it talks to its IdP, so a
    /// fetch that began before is not installed after.
    generations: Mutex<HashMap<EnvironmentName, u64>>,
    /// Reloads so far: a rejection answered to a fetch that began before the latest reload is
    /// not remembered (the reload may have fixed what was rejected).
    reloads: AtomicU64,
    /// Per (token URL, client id) state; a plain map because it only grows with configuration.
    upstreams: Mutex<HashMap<(String, String), Arc<Upstream>>>,
    idp: IdpClient,
    settings: CacheSettings,
    /// The level shared with other replicas, when configured.
    shared: Option<Arc<dyn SharedCache>>,
    /// How long to wait for a token another replica is fetching.
    wait_for_peer: Duration,
    metrics: Metrics,
    /// What every time-dependent decision reads (refresh ahead, pauses, remembered answers).
    clock: Clock,
    /// The client secrets in force where the broker rotates them.
    known_secrets: KnownSecrets,
    /// The rotations under way.
    rotations: Rotations,
    /// What the broker's own authorising tokens (for rotations) are charged to.
    own_budget: Arc<crate::limits::IdpBudget>,
}

impl Broker {
    /// Builds an empty broker with no shared level that counts its work in `metrics`.
    pub fn new(settings: CacheSettings, idp: IdpClient, metrics: Metrics, clock: Clock) -> Self {
        Self::build(settings, idp, metrics, None, Duration::ZERO, clock)
    }

    /// Builds an empty broker with a level shared by every replica, and starts applying the
    /// other replicas' changes to it (must run inside a Tokio runtime).
    pub fn with_shared_cache(
        settings: CacheSettings,
        idp: IdpClient,
        metrics: Metrics,
        shared: Arc<dyn SharedCache>,
        wait_for_peer: Duration,
        clock: Clock,
    ) -> Self {
        let events = shared.subscribe();
        let broker = Self::build(settings, idp, metrics, Some(shared), wait_for_peer, clock);
        broker.spawn_invalidations(events);
        broker
    }

    fn build(
        settings: CacheSettings,
        idp: IdpClient,
        metrics: Metrics,
        shared: Option<Arc<dyn SharedCache>>,
        wait_for_peer: Duration,
        clock: Clock,
    ) -> Self {
        let by_shared_key = Arc::new(SharedIndex::default());
        let index = Arc::clone(&by_shared_key);
        let tokens = Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(TokenExpiry {
                min_remaining: settings.min_remaining,
                clock: clock.clone(),
            })
            .eviction_listener(move |key, token: Arc<CachedToken>, cause| {
                // Before a removal or replacement returns: no kept grant hands it out again.
                token.retire();
                // A replaced entry keeps its key, and so its shared key.
                if cause != moka::notification::RemovalCause::Replaced {
                    index.remove(&token, &key);
                }
            })
            .support_invalidation_closures()
            .build_with_hasher(KeyHasher::default());
        let rejections = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(settings.negative_ttl.max(Duration::from_millis(1)))
            .support_invalidation_closures()
            .build_with_hasher(KeyHasher::default());
        Self {
            inner: Arc::new(Inner {
                tokens,
                by_shared_key,
                rejections,
                flights: Flights::default(),
                generations: Mutex::new(HashMap::new()),
                reloads: AtomicU64::new(0),
                upstreams: Mutex::new(HashMap::new()),
                idp,
                settings,
                shared,
                wait_for_peer,
                metrics,
                clock,
                known_secrets: KnownSecrets::default(),
                rotations: Rotations::default(),
                own_budget: rotation::own_budget(),
            }),
        }
    }

    /// The clock this broker reads, for the components that share its decisions.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
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
}
