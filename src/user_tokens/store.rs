//! User sessions behind their handles, in memory.
//!
//! A session holds one user's current access token and refresh token. It is found by the
//! SHA-256 of its handle, so the store never holds the handles themselves. Each session has its
//! own async mutex around its tokens: whoever finds the access token too old refreshes it while
//! the others wait and then take the new one (single flight per handle). Sessions are bounded
//! (`users.max_sessions`, least recently used first) and forgotten after `users.idle_timeout`
//! without a request.
//!
//! Sessions live in this replica's memory only: a caller must reach the replica that created its
//! handle, and a restart forgets every session. [`SessionStore`] is the one place sessions are
//! created, found and forgotten, so a shared level can later go behind it.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use moka::future::Cache;
use rand::RngCore as _;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::UserSettings;
use crate::broker::{CachedToken, TokenKey};

/// Prefix of handles, so a leaked one is recognisable in a secret scanner.
const HANDLE_PREFIX: &str = "uth_";

/// The SHA-256 of a handle: how a session is found.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HandleId([u8; 32]);

impl HandleId {
    /// The id of a presented handle.
    pub fn of(handle: &str) -> Self {
        Self(Sha256::digest(handle.as_bytes()).into())
    }
}

impl fmt::Debug for HandleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandleId(..)")
    }
}

/// A new random handle and its id.
pub fn new_handle() -> (String, HandleId) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let handle = format!("{HANDLE_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let id = HandleId::of(&handle);
    (handle, id)
}

/// A user's tokens: what the session's mutex guards.
pub struct Grant {
    /// The current access token.
    pub access: Arc<CachedToken>,
    /// The refresh token; `None` when the IdP gave none or refused it.
    pub refresh_token: Option<SecretString>,
}

/// One user session, bound to the caller that created it.
pub struct Session {
    id: HandleId,
    owner: Arc<str>,
    key: TokenKey,
    grant: Mutex<Grant>,
}

impl Session {
    /// A session for `owner` with the tokens of a code exchange.
    pub fn new(id: HandleId, owner: Arc<str>, key: TokenKey, grant: Grant) -> Self {
        Self {
            id,
            owner,
            key,
            grant: Mutex::new(grant),
        }
    }

    /// The id of the session's handle.
    pub fn id(&self) -> HandleId {
        self.id
    }

    /// The caller that created the session.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Tenant, environment, audience and scopes of the user token.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }

    /// The tokens, locked: one holder at a time, so one refresh at a time.
    pub async fn grant(&self) -> tokio::sync::MutexGuard<'_, Grant> {
        self.grant.lock().await
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("owner", &self.owner)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Sessions by handle id, in memory.
pub struct SessionStore {
    sessions: Cache<HandleId, Arc<Session>>,
}

impl SessionStore {
    /// An empty store bounded by `users.max_sessions` and `users.idle_timeout`.
    pub fn new(settings: &UserSettings) -> Self {
        let sessions = Cache::builder()
            .max_capacity(settings.max_sessions)
            .time_to_idle(settings.idle_timeout)
            .build();
        Self { sessions }
    }

    /// Keeps a new session.
    pub async fn insert(&self, session: Arc<Session>) {
        self.sessions.insert(session.id, session).await;
    }

    /// The session of a handle id, if kept.
    pub async fn get(&self, id: &HandleId) -> Option<Arc<Session>> {
        self.sessions.get(id).await
    }

    /// Forgets a session (its refresh token with it).
    pub async fn remove(&self, id: &HandleId) {
        self.sessions.invalidate(id).await;
    }
}
