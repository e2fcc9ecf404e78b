//! The shared level: what the broker asks of a cache that every replica sees.
//!
//! moka is level 1, private to a replica; [`SharedCache`] is level 2, shared by the fleet (Redis,
//! in the `shared_cache` module). The broker only reaches level 2 on a level-1 miss, from inside its
//! single-flight fetch, so a cache hit never waits on the network. A trait object keeps the
//! broker free of any Redis type: a broker without a shared level simply holds none.
//!
//! Entries are addressed by a [`SharedKey`], a SHA-256 of everything that decides which token an
//! IdP issues, and tokens are compared by [`TokenDigest`] (SHA-256 of the value), never by the
//! value; both, and the values exchanged, are the token core's (`crate::token`).

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::token::{
    CachedToken, Invalidation, LockToken, RotatedSecret, SharedCacheStatus, SharedEntry,
    SharedFuture, SharedKey, SharedSecret, SharedToken, TokenDigest,
};

/// The second cache level, shared by every replica. Every call is bounded in time and fails
/// fast while the level is marked down; the broker treats every error as "not there".
pub trait SharedCache: Send + Sync {
    /// The token stored under `key`, if any (an entry that cannot be decrypted is none).
    fn load<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, Option<SharedToken>>;

    /// What is stored, or was deleted, under each of `keys`, by digest, in order: cheaper than
    /// [`SharedCache::load`].
    fn entries<'a>(&'a self, keys: &'a [SharedKey]) -> SharedFuture<'a, Vec<SharedEntry>>;

    /// Stores `token` under `key` for `ttl` unless a newer token is already there, and tells
    /// the other replicas.
    fn store<'a>(
        &'a self,
        key: &'a SharedKey,
        token: &'a CachedToken,
        ttl: Duration,
    ) -> SharedFuture<'a, ()>;

    /// Takes the fetch lock of `key` for at most `shared_cache.lock_ttl`; `None` when another
    /// replica holds it.
    fn try_lock<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, Option<LockToken>>;

    /// Releases a lock this replica holds (a lock that expired and was taken since stays).
    fn unlock<'a>(&'a self, key: &'a SharedKey, lock: LockToken) -> SharedFuture<'a, ()>;

    /// Forgets the entry of `key` (only if it holds `only` when given) and tells the other
    /// replicas either way, since they may hold the token in memory.
    fn delete<'a>(&'a self, key: &'a SharedKey, only: Option<TokenDigest>) -> SharedFuture<'a, ()>;

    /// What a rotation left under `key` ([`SharedKey::for_secret`]): the secret, the tombstone
    /// of a dropped one, or nothing (a secret that cannot be opened is nothing).
    fn load_secret<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, SharedSecret>;

    /// Stores a rotated client secret under `key`, without expiry, and tells the other replicas.
    fn store_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        secret: &'a RotatedSecret,
    ) -> SharedFuture<'a, ()>;

    /// Stores `secret` under `key` again if nothing is there (the level lost its data), and
    /// tells the other replicas.
    fn restore_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        secret: &'a RotatedSecret,
    ) -> SharedFuture<'a, ()>;

    /// Replaces the secret under `key`, if it is still the one of `fingerprint`, with a
    /// tombstone dated `at`, and tells the other replicas either way.
    fn drop_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        fingerprint: &'a str,
        at: SystemTime,
    ) -> SharedFuture<'a, ()>;

    /// The changes other replicas make, from now on; called once.
    fn subscribe(&self) -> mpsc::Receiver<Invalidation>;

    /// Whether calls and invalidations work now.
    fn status(&self) -> SharedCacheStatus;
}
