//! The shared level: what the broker asks of a cache that every replica sees.
//!
//! moka is level 1, private to a replica; [`SharedCache`] is level 2, shared by the fleet (Redis,
//! in the `shared_cache` module). The broker only reaches level 2 on a level-1 miss, from inside its
//! single-flight fetch, so a cache hit never waits on the network. A trait object keeps the
//! broker free of any Redis type: a broker without a shared level simply holds none.
//!
//! Entries are addressed by a [`SharedKey`], a SHA-256 of everything that decides which token an
//! IdP issues (token URL, client id and request shape, tenant, environment, audience, scope), so
//! a changed identity never reads an old token and no audience appears in clear. Tokens are
//! compared by [`TokenDigest`] (SHA-256 of the value), never by the value.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::broker::{CachedToken, TokenKey};
use crate::idp::EnvironmentSettings;
use crate::idp::IssuedToken;
pub use crate::telemetry::metrics::SharedCacheStatus;

/// Where one token lives in the shared level: SHA-256 of its whole identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedKey([u8; 32]);

impl SharedKey {
    /// The key of `key`'s token as `environment`'s IdP client issues it.
    pub fn new(environment: &EnvironmentSettings, key: &TokenKey) -> Self {
        let mut hash = Sha256::new();
        let mut field = |value: &str| {
            // Length-prefixed, so no two different tuples hash the same bytes.
            hash.update((value.len() as u64).to_be_bytes());
            hash.update(value.as_bytes());
        };
        field("token-broker shared key v1");
        field(environment.token_url.as_str());
        field(&environment.client_id);
        field(&format!(
            "{:?}/{:?}/{:?}",
            environment.request_format, environment.client_auth, environment.audience_param
        ));
        for (name, value) in &environment.extra_params {
            field(name);
            field(value);
        }
        field(&key.tenant);
        field(&key.environment);
        field(&key.audience);
        field(key.scope.as_str());
        // Only when set, so that the keys of tenant-wide tokens stay what they were.
        if let Some(organization) = &key.organization {
            field("organization");
            field(organization);
        }
        Self(hash.finalize().into())
    }

    /// Lower-case hex, as it appears in Redis keys and invalidation messages.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`SharedKey::to_hex`] output.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedKey({})", self.to_hex())
    }
}

/// SHA-256 of an access token: how replicas name a token without revealing it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `access_token`.
    pub fn of(access_token: &str) -> Self {
        Self(Sha256::digest(access_token.as_bytes()).into())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses [`TokenDigest::to_hex`] output.
    pub fn from_hex(text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.to_hex())
    }
}

/// A token read back from the shared level.
#[derive(Debug)]
pub struct SharedToken {
    /// The token as the IdP issued it; `lifetime` is `expires_at - fetched_at`.
    pub issued: IssuedToken,
    /// When the replica that fetched it received it.
    pub fetched_at: SystemTime,
}

impl SharedToken {
    /// When the token stops being valid.
    pub fn expires_at(&self) -> SystemTime {
        self.fetched_at + self.issued.lifetime
    }

    /// Validity left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// A change another replica made to the shared level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A new token was stored (a fetch or a refresh); replicas holding an older one replace it.
    Stored {
        /// Which entry.
        key: SharedKey,
        /// The new token.
        token: TokenDigest,
    },
    /// The entry was forgotten (`DELETE`); with a digest, only where it still holds that token.
    Deleted {
        /// Which entry.
        key: SharedKey,
        /// The token that was rejected, for a compare-and-delete.
        token: Option<TokenDigest>,
    },
    /// The subscription was made (again): announcements sent before it may have been missed, so
    /// every cached entry is checked against the level.
    Resubscribed,
}

/// What the shared level holds for a key, for a replica that may have missed announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedEntry {
    /// A token of this digest is stored.
    Stored(TokenDigest),
    /// Nothing is stored; a `DELETE` forgot the token of this digest (`None`: whatever token a
    /// replica holds, as Redis held none) while it would still be valid.
    Deleted(Option<TokenDigest>),
    /// Neither (never stored, or expired).
    Absent,
}

/// The holder's proof of a cross-replica fetch lock; only it releases the lock.
pub struct LockToken(pub String);

/// Why the shared level could not answer; the broker then goes on without it.
#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    /// The shared level is marked down after a failure and is skipped until it answers again.
    #[error("the shared cache is marked down")]
    Down,
    /// A call took longer than `shared_cache.timeout`.
    #[error("the shared cache did not answer within {0:?}")]
    Timeout(Duration),
    /// The server answered with an error or the connection failed.
    #[error("the shared cache failed: {0}")]
    Backend(String),
}

/// The future of a shared-level call.
pub type SharedFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, SharedCacheError>> + Send + 'a>>;

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

    /// The changes other replicas make, from now on; called once.
    fn subscribe(&self) -> mpsc::Receiver<Invalidation>;

    /// Whether calls and invalidations work now.
    fn status(&self) -> SharedCacheStatus;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idp::ClientCredential;

    #[test]
    fn the_shared_key_covers_the_whole_identity() {
        let environment = |client_id: &str| {
            let url = reqwest::Url::parse("https://acme.example/oauth/token").unwrap();
            let secret = ClientCredential::Secret("s".to_owned().into());
            EnvironmentSettings::new("acme", "production", url, client_id, secret)
        };
        let (production, other) = (environment("id"), environment("another-id"));
        let (production, other) = (&production, &other);
        let key = TokenKey::new("acme", "production", "https://api", "b a");
        let shared = SharedKey::new(production, &key);
        assert_eq!(
            shared,
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api", "a b")
            )
        );
        for different in [
            SharedKey::new(other, &key),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api2", "a b"),
            ),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "production", "https://api", "a"),
            ),
            SharedKey::new(
                production,
                &TokenKey::new("acme", "staging", "https://api", "a b"),
            ),
        ] {
            assert_ne!(shared, different);
        }
        assert!(!shared.to_hex().contains("api"));
    }

    #[test]
    fn digests_and_keys_round_trip_through_hex() {
        let digest = TokenDigest::of("secret-token");
        assert_eq!(TokenDigest::from_hex(&digest.to_hex()), Some(digest));
        assert!(!format!("{digest:?}").contains("secret-token"));
        assert_eq!(TokenDigest::from_hex("zz"), None);
        let key = SharedKey([7; 32]);
        assert_eq!(SharedKey::from_hex(&key.to_hex()), Some(key));
    }
}
