//! The vocabulary of the level shared by replicas (Redis, in `shared_cache`): what machine tokens
//! and user sessions read back from it, what replicas announce to each other, the proof of a
//! cross-replica lock and the errors every shared-level call may return. The traits that use it
//! belong to the modules that ask (`broker::SharedCache`, `user_tokens::SharedSessions`).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};

use super::id::{SharedKey, TokenDigest};
use crate::idp::IssuedToken;
pub use crate::telemetry::metrics::SharedCacheStatus;

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
        // Both come from a shared-level value: saturate rather than trust them.
        self.fetched_at
            .checked_add(self.issued.lifetime)
            .unwrap_or(self.fetched_at)
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
    /// A client secret was rotated, or a rotated one dropped: replicas read it again.
    SecretChanged {
        /// Where the secret lives ([`SharedKey::for_secret`]).
        key: SharedKey,
    },
    /// The subscription was made (again), or the level answers again after being down:
    /// announcements may have been missed, so every cached entry (and rotated secret) is checked
    /// against the level.
    Resubscribed,
}

/// What the shared level holds for a client's rotated secret.
#[derive(Debug)]
pub enum SharedSecret {
    /// The secret in force.
    Stored(RotatedSecret),
    /// The secret of this fingerprint was dropped at `at`: the IdP took the configured one
    /// (rotated by hand), so no replica goes back to it.
    Dropped {
        /// The dropped secret's [`RotatedSecret::fingerprint`].
        fingerprint: String,
        /// When it was dropped.
        at: SystemTime,
    },
    /// Nothing: never rotated, or the level lost its data.
    Absent,
    /// A secret sealed with a key this replica lacks (a change of encryption key under way),
    /// or altered: not this replica's to use or to replace.
    Unreadable,
}

/// A client secret the broker rotated; its `Debug` shows the fingerprint, never the value.
#[derive(Clone)]
pub struct RotatedSecret {
    /// The secret the IdP issued.
    pub secret: SecretString,
    /// When the broker rotated it.
    pub rotated_at: SystemTime,
}

impl RotatedSecret {
    /// A short hash of the secret (16 hex digits of its SHA-256), to tell secrets apart in
    /// answers, logs and the shared level without revealing them.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.secret.expose_secret())
    }
}

/// 16 hex digits of the SHA-256 of `secret`.
pub fn fingerprint(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    hex::encode(digest.get(..8).unwrap_or_default())
}

impl std::fmt::Debug for RotatedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotatedSecret")
            .field("fingerprint", &self.fingerprint())
            .field("rotated_at", &self.rotated_at)
            .finish()
    }
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
    /// A write met a newer value this replica cannot read (altered, or sealed with a key it
    /// lacks): not written, and not taken for another replica's newer one. The level works.
    #[error("a newer value this replica cannot read is in the way")]
    Blocked,
}

/// The future of a shared-level call.
pub type SharedFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, SharedCacheError>> + Send + 'a>>;
