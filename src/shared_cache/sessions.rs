//! User sessions and pending authorizations in Redis: [`RedisCache`] implements
//! [`SharedSessions`].
//!
//! Keys (`P` is `shared_cache.key_prefix`):
//!
//! - `P session:H`, `H` the hex SHA-256 of the handle: the encrypted session, expiring after
//!   `users.idle_timeout` without a request (each read sets the expiry again, `GETEX`), or
//!   `deleted` for as long once it was deleted, so no late write brings it back;
//! - `P session-lock:H`: the refresh lock, as `P lock:K` is for M2M fetches;
//! - `P pending:S`, `S` the hex SHA-256 of the state with the caller, tenant and environment it
//!   is for: the encrypted pending authorization, for `users.authorization_timeout`, taken by
//!   the first redemption;
//! - `P pending-by:O`, `O` the hex SHA-256 of the caller: a sorted set of that caller's pending
//!   authorizations by expiry, which bounds them (`users.max_pending_per_caller`) in the fleet.
//!
//! On a Redis Cluster the ids are hash tags (`P session:{H}`), and a pending authorization is
//! tagged by its owner (`P pending:{O}:S`, `P pending-by:{O}`), which its scripts touch together.
//!
//! Values are sealed like tokens ([`TokenCipher::seal_bytes`]), bound to their Redis key:
//! `s1:<generation, 16 digits>:<key id>:<ciphertext>` for a session (the store script keeps the
//! highest generation), `p1:<key id>:<ciphertext>` for an authorization. The ciphertext holds
//! the owner, the user token's key, the access and refresh tokens or the PKCE verifier.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::TokenCipher;
use super::cipher::{self, OpenError};
use super::scripts::{PENDING_START_SCRIPT, PENDING_TAKE_SCRIPT, SESSION_STORE_SCRIPT};
use super::{Attempt, Inner, RedisCache};
use crate::clock::{ttl_millis, unix_millis};
use crate::idp::{AccessToken, IssuedToken};
use crate::token::{
    HandleId, LockToken, PendingId, SharedCacheError, SharedFuture, SharedToken, TokenKey,
};
use crate::user_tokens::{
    PendingAuthorization, SessionLookup, SessionRecord, SessionWrite, SharedSessions,
};

/// The value of a deleted session's key.
const TOMBSTONE: &[u8] = b"deleted";
/// Clear fields of a session value before the key id: `s1:` and 16 digits and `:`.
const SESSION_FIELDS_LEN: usize = 20;
/// Clear fields of a pending authorization's value before the key id: `p1:`.
const PENDING_FIELDS_LEN: usize = 3;
/// Largest value read back; ours are a few kilobytes (tokens are bounded by the IdP client).
const MAX_VALUE_BYTES: usize = 256 * 1024;

/// The scripts of sessions and pending authorizations, hashed once.
pub(super) struct SessionScripts {
    store: Script,
    start_pending: Script,
    take_pending: Script,
}

impl SessionScripts {
    pub(super) fn new() -> Self {
        Self {
            store: Script::new(SESSION_STORE_SCRIPT),
            start_pending: Script::new(PENDING_START_SCRIPT),
            take_pending: Script::new(PENDING_TAKE_SCRIPT),
        }
    }
}

/// The encrypted part of a session. No `Debug`: it holds the tokens.
#[derive(Serialize, Deserialize)]
struct SealedSession {
    owner: String,
    key: SealedKey,
    access_token: String,
    token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_scope: Option<String>,
    fetched_at_ms: u64,
    expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    generation: u64,
}

/// The encrypted part of a pending authorization. No `Debug`: it holds the PKCE verifier.
#[derive(Serialize, Deserialize)]
struct SealedPending {
    owner: String,
    key: SealedKey,
    code_verifier: String,
    redirect_uri: String,
}

#[derive(Serialize, Deserialize)]
struct SealedKey {
    tenant: String,
    environment: String,
    audience: String,
    scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    organization: Option<String>,
}

impl SealedKey {
    fn of(key: &TokenKey) -> Self {
        Self {
            tenant: key.tenant.to_string(),
            environment: key.environment.to_string(),
            audience: key.audience.to_string(),
            scope: key.scope.as_str().to_owned(),
            organization: key.organization.as_deref().map(str::to_owned),
        }
    }

    fn into_key(self) -> TokenKey {
        TokenKey::new(&self.tenant, &self.environment, &self.audience, &self.scope)
            .for_organization(self.organization.map(Arc::from))
    }
}

impl Inner {
    fn session_key(&self, id: &HandleId) -> String {
        self.key("session", &id.to_hex(), None)
    }

    /// Tagged by its owner, as the owner's set is: the scripts touch both.
    fn pending_key(&self, id: &PendingId, owner: &str) -> String {
        self.key("pending", &owner_tag(owner), Some(&id.to_hex()))
    }

    fn pending_owner_key(&self, owner: &str) -> String {
        self.key("pending-by", &owner_tag(owner), None)
    }
}

/// The hex SHA-256 of a pending authorization's owner (the caller), which names its set.
fn owner_tag(owner: &str) -> String {
    hex::encode(Sha256::digest(owner.as_bytes()))
}

/// The value that stores `record` under the Redis key `redis_key`.
fn seal_session(cipher: &TokenCipher, redis_key: &str, record: &SessionRecord) -> String {
    let access = &record.access;
    let sealed = SealedSession {
        owner: record.owner.to_string(),
        key: SealedKey::of(&record.key),
        access_token: access.issued.access_token.expose().to_owned(),
        token_type: access.issued.token_type.clone(),
        token_scope: access.issued.scope.clone(),
        fetched_at_ms: unix_millis(access.fetched_at),
        expires_at_ms: unix_millis(access.expires_at()),
        refresh_token: record
            .refresh_token
            .as_ref()
            .map(|token| token.expose_secret().to_owned()),
        generation: record.generation,
    };
    let plaintext = serde_json::to_vec(&sealed).expect("a session serialises");
    let fields = format!("s1:{:016}:", record.generation);
    cipher.seal_bytes(redis_key, &fields, &plaintext)
}

/// Reads a session value stored under `redis_key`.
fn open_session(
    cipher: &TokenCipher,
    redis_key: &str,
    value: &[u8],
) -> Result<SessionRecord, OpenError> {
    if value.len() > MAX_VALUE_BYTES || !value.starts_with(b"s1:") {
        return Err(OpenError::Malformed);
    }
    let (fields, plaintext) = cipher.open_bytes(redis_key, value, SESSION_FIELDS_LEN)?;
    let sealed: SealedSession =
        serde_json::from_slice(&plaintext).map_err(|_| OpenError::Malformed)?;
    // The script compares the clear generation: it must be the sealed one.
    if fields != format!("s1:{:016}:", sealed.generation) {
        return Err(OpenError::Malformed);
    }
    let (fetched_at, lifetime) = cipher::times(sealed.fetched_at_ms, sealed.expires_at_ms)?;
    Ok(SessionRecord {
        owner: Arc::from(sealed.owner),
        key: sealed.key.into_key(),
        access: SharedToken {
            issued: IssuedToken {
                access_token: AccessToken::new(sealed.access_token),
                token_type: sealed.token_type,
                lifetime,
                scope: sealed.token_scope,
            },
            fetched_at,
        },
        refresh_token: sealed.refresh_token.map(SecretString::from),
        generation: sealed.generation,
    })
}

impl Inner {
    fn open_pending(
        &self,
        redis_key: &str,
        value: &[u8],
    ) -> Result<PendingAuthorization, OpenError> {
        if value.len() > MAX_VALUE_BYTES || !value.starts_with(b"p1:") {
            return Err(OpenError::Malformed);
        }
        let (_, plaintext) = self
            .cipher
            .open_bytes(redis_key, value, PENDING_FIELDS_LEN)?;
        let sealed: SealedPending =
            serde_json::from_slice(&plaintext).map_err(|_| OpenError::Malformed)?;
        Ok(PendingAuthorization::new(
            Arc::from(sealed.owner),
            sealed.key.into_key(),
            SecretString::from(sealed.code_verifier),
            sealed.redirect_uri,
        ))
    }

    async fn load_session(
        &self,
        id: &HandleId,
        idle: Duration,
    ) -> Result<SessionLookup, SharedCacheError> {
        let redis_key = self.session_key(id);
        let mut connection = self.connection()?;
        let mut getex = redis::cmd("GETEX");
        getex.arg(&redis_key).arg("PX").arg(ttl_millis(idle));
        let value: Option<Vec<u8>> = self.call(getex.query_async(&mut connection)).await?;
        Ok(match value {
            None => SessionLookup::Absent,
            Some(value) if value == TOMBSTONE => SessionLookup::Deleted,
            Some(value) => match open_session(&self.cipher, &redis_key, &value) {
                Ok(record) => SessionLookup::Found(Box::new(record)),
                Err(error) => {
                    tracing::warn!(%error, "ignoring an unreadable user session in the shared cache");
                    SessionLookup::Absent
                }
            },
        })
    }

    async fn store_session(
        &self,
        id: &HandleId,
        record: &SessionRecord,
        idle: Duration,
    ) -> Result<SessionWrite, SharedCacheError> {
        let redis_key = self.session_key(id);
        let value = seal_session(&self.cipher, &redis_key, record);
        let mut invocation = self.session_scripts.store.key(&redis_key);
        invocation
            .arg(value)
            .arg(format!("{:016}", record.generation))
            .arg(ttl_millis(idle));
        let mut connection = self.connection()?;
        // Twice at most: a newer value that expires between the script and the check below is
        // written over at once.
        for _ in 0..2 {
            let written: i64 = self.call(invocation.invoke_async(&mut connection)).await?;
            match written {
                1 => return Ok(SessionWrite::Stored),
                -1 => return Ok(SessionWrite::Deleted),
                _ => {}
            }
            // Superseded only by a session this replica can read: a value whose clear
            // generation is higher but that does not open (altered, or sealed with a key this
            // replica lacks) must not make it drop the tokens it holds.
            let newer = self.get(&redis_key).await?;
            match newer {
                Some(value) if value == TOMBSTONE => return Ok(SessionWrite::Deleted),
                Some(value) if open_session(&self.cipher, &redis_key, &value).is_ok() => {
                    return Ok(SessionWrite::Superseded);
                }
                Some(_) => return Err(SharedCacheError::Blocked),
                None => {}
            }
        }
        Err(SharedCacheError::Blocked)
    }

    async fn delete_session(&self, id: &HandleId, idle: Duration) -> Result<(), SharedCacheError> {
        let mut set = redis::cmd("SET");
        set.arg(self.session_key(id))
            .arg(TOMBSTONE)
            .arg("PX")
            .arg(ttl_millis(idle));
        let mut connection = self.connection()?;
        let _: Option<String> = self.call(set.query_async(&mut connection)).await?;
        Ok(())
    }

    fn session_lock_key(&self, id: &HandleId) -> String {
        self.key("session-lock", &id.to_hex(), None)
    }

    async fn start_pending(
        &self,
        id: &PendingId,
        pending: &PendingAuthorization,
        ttl: Duration,
        max_per_owner: usize,
    ) -> Result<bool, SharedCacheError> {
        let redis_key = self.pending_key(id, &pending.owner);
        let sealed = SealedPending {
            owner: pending.owner.to_string(),
            key: SealedKey::of(&pending.key),
            code_verifier: pending.expose_code_verifier().to_owned(),
            redirect_uri: pending.redirect_uri.clone(),
        };
        let plaintext = serde_json::to_vec(&sealed).expect("an authorization serialises");
        let value = self.cipher.seal_bytes(&redis_key, "p1:", &plaintext);
        let mut invocation = self.session_scripts.start_pending.key(&redis_key);
        invocation
            .key(self.pending_owner_key(&pending.owner))
            .arg(value)
            .arg(ttl_millis(ttl))
            .arg(max_per_owner)
            .arg(id.to_hex());
        let mut connection = self.connection()?;
        let kept: i64 = self.call(invocation.invoke_async(&mut connection)).await?;
        Ok(kept == 1)
    }

    async fn take_pending(
        &self,
        id: &PendingId,
        owner: &str,
    ) -> Result<Option<PendingAuthorization>, SharedCacheError> {
        let redis_key = self.pending_key(id, owner);
        let mut invocation = self.session_scripts.take_pending.key(&redis_key);
        invocation
            .key(self.pending_owner_key(owner))
            .arg(id.to_hex());
        let mut connection = self.connection()?;
        let value: Option<Vec<u8>> = self.call(invocation.invoke_async(&mut connection)).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        match self.open_pending(&redis_key, &value) {
            Ok(pending) => Ok(Some(pending)),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable pending authorization in the shared cache");
                Ok(None)
            }
        }
    }
}

impl SharedSessions for RedisCache {
    fn load_session<'a>(
        &'a self,
        id: &'a HandleId,
        idle: Duration,
    ) -> SharedFuture<'a, SessionLookup> {
        Box::pin(self.inner.load_session(id, idle))
    }

    fn store_session<'a>(
        &'a self,
        id: &'a HandleId,
        record: &'a SessionRecord,
        idle: Duration,
    ) -> SharedFuture<'a, SessionWrite> {
        Box::pin(self.inner.store_session(id, record, idle))
    }

    fn delete_session<'a>(&'a self, id: &'a HandleId, idle: Duration) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.delete_session(id, idle))
    }

    fn lock_session<'a>(&'a self, id: &'a HandleId) -> SharedFuture<'a, Option<LockToken>> {
        Box::pin(
            self.inner
                .take_lock(self.inner.session_lock_key(id), Attempt::EvenIfDown),
        )
    }

    fn unlock_session<'a>(&'a self, id: &'a HandleId, lock: LockToken) -> SharedFuture<'a, ()> {
        Box::pin(
            self.inner
                .release_lock(self.inner.session_lock_key(id), lock),
        )
    }

    fn start_pending<'a>(
        &'a self,
        id: &'a PendingId,
        pending: &'a PendingAuthorization,
        ttl: Duration,
        max_per_owner: usize,
    ) -> SharedFuture<'a, bool> {
        Box::pin(self.inner.start_pending(id, pending, ttl, max_per_owner))
    }

    fn take_pending<'a>(
        &'a self,
        id: &'a PendingId,
        owner: &'a str,
    ) -> SharedFuture<'a, Option<PendingAuthorization>> {
        Box::pin(self.inner.take_pending(id, owner))
    }

    fn wait_for_peer(&self) -> Duration {
        self.inner.wait_for_peer
    }

    fn recoveries(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.recoveries.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use secrecy::SecretBox;

    use super::*;
    use crate::shared_cache::TokenCipher;

    fn cipher() -> TokenCipher {
        TokenCipher::new(&SecretBox::new(Box::new([7u8; 32])), None)
    }

    fn record(generation: u64) -> SessionRecord {
        let key = TokenKey::new("acme", "production", "https://api", "openid offline_access")
            .for_organization(Some(Arc::from("org_1")));
        SessionRecord {
            owner: Arc::from("billing"),
            key,
            access: SharedToken {
                issued: IssuedToken {
                    access_token: AccessToken::new("user-access-token"),
                    token_type: "Bearer".into(),
                    lifetime: Duration::from_secs(3600),
                    scope: Some("openid".into()),
                },
                fetched_at: std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            },
            refresh_token: Some(SecretString::from("user-refresh-token")),
            generation,
        }
    }

    #[test]
    fn a_session_value_is_sealed_bound_to_its_key_and_shows_only_its_generation() {
        let cipher = cipher();
        let value = seal_session(&cipher, "tb:session:aa", &record(42));
        assert!(value.starts_with("s1:0000000000000042:"), "{value}");
        for secret in [
            "user-access-token",
            "user-refresh-token",
            "billing",
            "acme",
            "org_1",
        ] {
            assert!(!value.contains(secret), "{secret} in {value}");
        }
        // The store script reads the generation at string.sub(old, 4, 19).
        assert!(SESSION_STORE_SCRIPT.contains("string.sub(old, 4, 19)"));
        assert_eq!(value.get(3..19), Some("0000000000000042"));

        let opened = open_session(&cipher, "tb:session:aa", value.as_bytes()).unwrap();
        assert_eq!(opened.generation, 42);
        assert_eq!(&*opened.owner, "billing");
        assert_eq!(opened.key, record(42).key);
        assert_eq!(
            opened.access.issued.access_token.expose(),
            "user-access-token"
        );
        assert_eq!(opened.access.issued.lifetime, Duration::from_secs(3600));
        assert_eq!(opened.access.fetched_at, record(42).access.fetched_at);
        let refresh = opened.refresh_token.as_ref().map(|t| t.expose_secret());
        assert_eq!(refresh, Some("user-refresh-token"));
        assert!(!format!("{opened:?}").contains("user-"), "{opened:?}");

        // Moved to another session's key, or with its generation edited: not readable.
        assert!(matches!(
            open_session(&cipher, "tb:session:bb", value.as_bytes()),
            Err(OpenError::Inauthentic)
        ));
        let edited = value.replacen("s1:0000000000000042", "s1:0000000000000099", 1);
        assert!(matches!(
            open_session(&cipher, "tb:session:aa", edited.as_bytes()),
            Err(OpenError::Inauthentic)
        ));
        assert!(open_session(&cipher, "tb:session:aa", b"deleted").is_err());
        assert!(open_session(&cipher, "tb:session:aa", b"s1:").is_err());
    }
}
