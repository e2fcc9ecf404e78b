//! What user tokens ask of a level every replica sees: sessions and pending authorizations by
//! hashed id, and the cross-replica lock that makes a refresh single flight in the fleet.
//!
//! [`SharedSessions`] is implemented by `shared_cache` (Redis); without one, sessions and
//! authorizations live in the replica's memory only. Ids are SHA-256 digests of the handle or of
//! the state with what it is bound to, so the level never holds a handle or a state. Every
//! session write carries a generation, raised by each refresh: the level keeps the highest, so a
//! late write never replaces a rotated refresh token with an older one, and a deleted session
//! stays deleted (a tombstone) for its idle timeout, so no late write brings it back.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use super::pending::PendingAuthorization;
use crate::token::{HandleId, LockToken, PendingId, SharedFuture, SharedToken, TokenKey};

/// A session as the shared level keeps it.
pub struct SessionRecord {
    /// The caller that created the session.
    pub owner: Arc<str>,
    /// Tenant, environment, audience and scopes of the user token.
    pub key: TokenKey,
    /// The current access token.
    pub access: SharedToken,
    /// The refresh token; `None` when the IdP gave none.
    pub refresh_token: Option<SecretString>,
    /// 1 at the code exchange, raised by each refresh.
    pub generation: u64,
}

impl fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRecord")
            .field("owner", &self.owner)
            .field("key", &self.key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What the shared level holds under a handle's id.
#[derive(Debug)]
pub enum SessionLookup {
    /// The session (an entry that cannot be decrypted is [`SessionLookup::Absent`]).
    Found(Box<SessionRecord>),
    /// Its owner deleted it, or the IdP refused its refresh token.
    Deleted,
    /// Nothing: it expired, was never written, or Redis lost it.
    Absent,
}

/// What a session write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionWrite {
    /// Written (or the same generation was there already).
    Stored,
    /// A higher generation was there: another replica refreshed since.
    Superseded,
    /// The session was deleted meanwhile; nothing was written.
    Deleted,
}

/// The level shared by replicas, as user tokens use it. Every call is bounded in time and fails
/// fast while the level is marked down.
pub trait SharedSessions: Send + Sync {
    /// The session of `id`, its idle timeout (`idle`) starting again.
    fn load_session<'a>(
        &'a self,
        id: &'a HandleId,
        idle: Duration,
    ) -> SharedFuture<'a, SessionLookup>;

    /// Writes `record` for `idle` unless a higher generation or a deletion is there.
    fn store_session<'a>(
        &'a self,
        id: &'a HandleId,
        record: &'a SessionRecord,
        idle: Duration,
    ) -> SharedFuture<'a, SessionWrite>;

    /// Deletes the session of `id`, leaving a tombstone for `ttl` that no late write replaces.
    fn delete_session<'a>(&'a self, id: &'a HandleId, ttl: Duration) -> SharedFuture<'a, ()>;

    /// Takes the refresh lock of `id` for at most `shared_cache.lock_ttl`; `None` when another
    /// replica holds it. Tried even while the level is marked down after a failure: a refresh
    /// without the lock is a risk worth one more timeout.
    fn lock_session<'a>(&'a self, id: &'a HandleId) -> SharedFuture<'a, Option<LockToken>>;

    /// Releases a refresh lock this replica holds.
    fn unlock_session<'a>(&'a self, id: &'a HandleId, lock: LockToken) -> SharedFuture<'a, ()>;

    /// Keeps `pending` under `id` for `ttl` unless its owner has `max_per_owner` pending in the
    /// fleet already (then `false`).
    fn start_pending<'a>(
        &'a self,
        id: &'a PendingId,
        pending: &'a PendingAuthorization,
        ttl: Duration,
        max_per_owner: usize,
    ) -> SharedFuture<'a, bool>;

    /// Takes (reads and deletes, atomically) the authorization under `id`, which `owner` started.
    fn take_pending<'a>(
        &'a self,
        id: &'a PendingId,
        owner: &'a str,
    ) -> SharedFuture<'a, Option<PendingAuthorization>>;

    /// How long to wait for another replica's refresh (`shared_cache.wait_for_peer`).
    fn wait_for_peer(&self) -> Duration;

    /// Counts the times the level answered again after being down: each is a moment to write
    /// back what it may have lost, or never received.
    fn recoveries(&self) -> tokio::sync::watch::Receiver<u64>;
}
