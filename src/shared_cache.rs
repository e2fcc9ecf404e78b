//! Redis (or Valkey) as the cache level shared by every replica: [`RedisCache`] implements the
//! broker's [`SharedCache`], and user tokens'
//! [`SharedSessions`](crate::user_tokens::SharedSessions) (in [`sessions`]).
//!
//! Keys (`P` is `shared_cache.key_prefix`, `K` the hex [`SharedKey`]; on a Redis Cluster each
//! id is a hash tag, `P token:{K}`, so that the keys one script touches share a slot, see
//! [`cluster`]):
//!
//! - `P token:K`: the encrypted token ([`TokenCipher`]), expiring with `PX` when the broker would
//!   stop handing it out (`expires_at - cache.min_remaining`);
//! - `P deleted:K`: the digest of a token a `DELETE` forgot, for as long as that token would
//!   have lived, so a replica that missed the announcement can tell a deletion from a store it
//!   missed;
//! - `P lock:K`: the cross-replica fetch lock, `SET NX PX shared_cache.lock_ttl` with a random
//!   value, released only by its holder (compare-and-delete in Lua);
//! - `P secret:K`: a client secret the broker rotated, sealed, without expiry (K is
//!   [`SharedKey::for_secret`]; see [`secrets`]);
//! - channel `P invalidate`: one line per change, `stored <origin> K <digest>`,
//!   `deleted <origin> K [<digest>]` or `secret <origin> K`, published in the same script as the
//!   change. Every replica
//!   subscribes and ignores its own lines (`origin` is a random id per process).
//!
//! Failure handling: every call is bounded by `shared_cache.timeout`. The first failure marks the
//! level down (one log line with the cause, repeated once a minute while it stays down) and later
//! calls fail at once without touching the network, so a dead or slow Redis costs requests
//! nothing; a probe `PING`s every second and marks it up again (one log line). The connection
//! manager reconnects by itself; the subscriber reconnects with backoff and checks its
//! connection with `PING`s, since a half-open one would otherwise stay silent. Announcements sent
//! while a replica is not subscribed are lost to it, so after every subscription it checks its
//! cached entries against the level by digest ([`Invalidation::Resubscribed`]).

mod cipher;
mod cluster;
mod connection;
mod scripts;
mod secrets;
mod sessions;
mod settings;
mod subscriber;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng as _;
use redis::{RedisResult, Script};
use tokio::sync::mpsc;

use crate::broker::SharedCache;
use crate::clock::ttl_millis;
use crate::token::{
    CachedToken, Invalidation, LockToken, RotatedSecret, SharedCacheError, SharedCacheStatus,
    SharedEntry, SharedFuture, SharedKey, SharedSecret, SharedToken, TokenDigest,
};

pub use cipher::{OpenError, TokenCipher};
pub use settings::{
    ClientIdentity, ENCRYPTION_KEY_LEN, EncryptionKey, RedisTarget, RedisTls, SentinelSettings,
    SharedCacheSettings,
};

use connection::Connections;
use scripts::{DELETE_SCRIPT, STORE_SCRIPT, UNLOCK_SCRIPT};

/// How often the health probe `PING`s Redis.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// While the level stays down, how often its cause is logged again.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Announcements buffered between the subscriber and the broker.
const INVALIDATION_QUEUE: usize = 1024;

/// How long the tombstone of a deletion lives when Redis held no token to take the time from.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

/// Cached entries checked against Redis in one call after a subscription.
const ENTRY_BATCH: usize = 200;

/// Why the shared cache could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedisCacheError {
    /// The URL was accepted by validation but not by the client.
    #[error(
        "the shared cache cannot be set up (shared_cache.url, sentinels, cluster_nodes or tls): {0}"
    )]
    Client(#[source] redis::RedisError),
}

/// The shared level in Redis; cheap to clone. Must be built inside a Tokio runtime.
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    connections: Connections,
    cipher: TokenCipher,
    prefix: String,
    channel: String,
    /// This process's id in announcements, to ignore its own.
    origin: String,
    timeout: Duration,
    lock_ttl: Duration,
    /// `host:port`, for logs.
    endpoint: String,
    store: Script,
    delete: Script,
    unlock: Script,
    secret_store: Script,
    secret_restore: Script,
    secret_reseal: Script,
    secret_drop: Script,
    session_scripts: sessions::SessionScripts,
    /// `shared_cache.wait_for_peer`, for user sessions' refreshes.
    wait_for_peer: Duration,
    /// Bumped each time the level answers again after being down.
    recoveries: tokio::sync::watch::Sender<u64>,
    up: AtomicBool,
    /// When a failure was last logged, so a level that stays down is reported once a minute.
    failure_logged: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// When the sentinels' failure was last logged.
    sentinels_logged: std::sync::Mutex<Option<tokio::time::Instant>>,
    subscribed: AtomicBool,
    /// Which seed of a cluster the subscriber tries next.
    subscriber_turn: std::sync::atomic::AtomicUsize,
    /// A Redis Cluster: keys carry hash tags.
    cluster: bool,
    errors: AtomicU64,
    invalidations: AtomicU64,
}

/// Whether a call is made while the level is marked down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    /// Fail at once while marked down (every call but one).
    UnlessDown,
    /// Try anyway: a session's refresh lock, whose absence risks more than a timeout costs.
    EvenIfDown,
}

fn random_hex() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

impl RedisCache {
    /// Connects lazily (a Redis that is down at start is used once it answers) and starts the
    /// health probe.
    pub fn new(settings: &SharedCacheSettings) -> Result<Self, RedisCacheError> {
        let connections = Connections::new(settings).map_err(RedisCacheError::Client)?;
        let prefix = settings.key_prefix.clone();
        let inner = Arc::new(Inner {
            connections,
            cipher: TokenCipher::new(
                &settings.encryption_key,
                settings.previous_encryption_key.as_ref(),
            ),
            channel: format!("{prefix}invalidate"),
            prefix,
            origin: random_hex(),
            timeout: settings.timeout,
            lock_ttl: settings.lock_ttl,
            endpoint: settings.endpoint(),
            store: Script::new(STORE_SCRIPT),
            delete: Script::new(DELETE_SCRIPT),
            unlock: Script::new(UNLOCK_SCRIPT),
            secret_store: Script::new(secrets::SECRET_STORE_SCRIPT),
            secret_restore: Script::new(secrets::SECRET_RESTORE_SCRIPT),
            secret_reseal: Script::new(secrets::SECRET_RESEAL_SCRIPT),
            secret_drop: Script::new(secrets::SECRET_DROP_SCRIPT),
            session_scripts: sessions::SessionScripts::new(),
            wait_for_peer: settings.wait_for_peer,
            recoveries: tokio::sync::watch::Sender::new(0),
            // Behind Sentinel the level takes calls once the master is known.
            up: AtomicBool::new(!matches!(settings.target, RedisTarget::Sentinel(_))),
            failure_logged: std::sync::Mutex::new(None),
            sentinels_logged: std::sync::Mutex::new(None),
            subscribed: AtomicBool::new(false),
            subscriber_turn: std::sync::atomic::AtomicUsize::new(0),
            cluster: settings.target.is_cluster(),
            errors: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        });
        tracing::info!(
            endpoint = %inner.endpoint,
            key_id = inner.cipher.key_id(),
            "shared cache (Redis) configured"
        );
        tokio::spawn(probe(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

impl RedisCache {
    /// Reconnects with the credentials of `settings` (password, user, TLS files), which name
    /// the same level ([`SharedCacheSettings::same_place`]); entries stay where they are.
    pub fn apply_credentials(&self, settings: &SharedCacheSettings) -> Result<(), RedisCacheError> {
        self.inner
            .connections
            .replace_credentials(settings)
            .map_err(RedisCacheError::Client)?;
        tracing::info!(endpoint = %self.inner.endpoint, "shared cache (Redis) credentials replaced; reconnecting with them");
        Ok(())
    }
}

impl Inner {
    /// The connection of the server (or cluster) in force; the level counts as down until the
    /// sentinels have named a master.
    fn connection(&self) -> Result<connection::Connection, SharedCacheError> {
        self.connections
            .current()
            .map(|endpoint| endpoint.connection.clone())
            .ok_or(SharedCacheError::Down)
    }

    /// `P kind:id`, or on a cluster `P kind:{tag}` with `id` after it when it is not the tag
    /// itself: the keys one script touches share their tag, so a cluster keeps them in one slot
    /// (one server and Sentinel keep the layout without tags).
    fn key(&self, kind: &str, tag: &str, id: Option<&str>) -> String {
        match (self.cluster, id) {
            (false, None) => format!("{}{kind}:{tag}", self.prefix),
            (false, Some(id)) => format!("{}{kind}:{id}", self.prefix),
            (true, None) => format!("{}{kind}:{{{tag}}}", self.prefix),
            (true, Some(id)) => format!("{}{kind}:{{{tag}}}:{id}", self.prefix),
        }
    }

    fn token_key(&self, key: &SharedKey) -> String {
        self.key("token", &key.to_hex(), None)
    }

    fn tombstone_key(&self, key: &SharedKey) -> String {
        self.key("deleted", &key.to_hex(), None)
    }

    fn lock_key(&self, key: &SharedKey) -> String {
        self.key("lock", &key.to_hex(), None)
    }

    /// Runs one Redis call within the timeout, unless the level is marked down.
    async fn call<T>(
        &self,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SharedCacheError> {
        self.call_as(Attempt::UnlessDown, call).await
    }

    /// Runs one Redis call within the timeout, even while the level is marked down if `attempt`
    /// says so.
    async fn call_as<T>(
        &self,
        attempt: Attempt,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SharedCacheError> {
        if attempt == Attempt::UnlessDown && !self.up.load(Ordering::Relaxed) {
            return Err(SharedCacheError::Down);
        }
        let error = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => {
                if attempt == Attempt::EvenIfDown {
                    // It answered: the calls that follow need not wait for the probe.
                    self.recover();
                }
                return Ok(value);
            }
            Ok(Err(error)) => SharedCacheError::Backend(error.to_string()),
            Err(_) => SharedCacheError::Timeout(self.timeout),
        };
        self.fail(&error);
        Err(error)
    }

    fn fail(&self, error: &SharedCacheError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let mut logged = self
            .failure_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                endpoint = %self.endpoint,
                %error,
                "shared cache (Redis) degraded: serving from memory and the IdP until it answers again"
            );
            *logged = Some(now);
        } else if logged.is_none_or(|at| now.duration_since(at) >= FAILURE_LOG_INTERVAL) {
            tracing::warn!(
                endpoint = %self.endpoint,
                %error,
                "shared cache (Redis) still unreachable: serving from memory and the IdP"
            );
            *logged = Some(now);
        }
    }

    /// Logs that the sentinels cannot say where the master is, at most once a minute.
    fn sentinels_failing(&self, error: &str) {
        let now = tokio::time::Instant::now();
        let mut logged = self
            .sentinels_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.is_none_or(|at| now.duration_since(at) >= FAILURE_LOG_INTERVAL) {
            tracing::warn!(
                %error,
                "the sentinels cannot say where the Redis master is; keeping the one in use"
            );
            *logged = Some(now);
        }
    }

    fn recover(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!(endpoint = %self.endpoint, "shared cache (Redis) answers again; using it");
            self.recoveries
                .send_modify(|count| *count = count.wrapping_add(1));
        }
    }

    /// The value under `redis_key`, if any.
    async fn get(&self, redis_key: &str) -> Result<Option<Vec<u8>>, SharedCacheError> {
        let mut connection = self.connection()?;
        self.call(
            redis::cmd("GET")
                .arg(redis_key)
                .query_async(&mut connection),
        )
        .await
    }

    async fn load(&self, key: &SharedKey) -> Result<Option<SharedToken>, SharedCacheError> {
        let redis_key = self.token_key(key);
        let value = self.get(&redis_key).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        match self.cipher.open(&redis_key, &value) {
            Ok(token) => Ok(Some(token)),
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable shared cache entry");
                Ok(None)
            }
        }
    }

    async fn store(
        &self,
        key: &SharedKey,
        token: &CachedToken,
        ttl: Duration,
    ) -> Result<(), SharedCacheError> {
        let redis_key = self.token_key(key);
        let value = self.cipher.seal(&redis_key, token);
        let message = format!(
            "stored {} {} {}",
            self.origin,
            key.to_hex(),
            token.digest().to_hex()
        );
        let ttl_ms = ttl_millis(ttl);
        let mut connection = self.connection()?;
        let mut invocation = self.store.key(&redis_key);
        invocation
            .arg(value)
            .arg(cipher::fetched_at_field(token.fetched_at))
            .arg(ttl_ms)
            .arg(&self.channel)
            .arg(message);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    async fn try_lock(&self, key: &SharedKey) -> Result<Option<LockToken>, SharedCacheError> {
        self.take_lock(self.lock_key(key), Attempt::UnlessDown)
            .await
    }

    /// `SET lock_key <random> NX PX lock_ttl`: the lock, unless another replica holds it.
    async fn take_lock(
        &self,
        lock_key: String,
        attempt: Attempt,
    ) -> Result<Option<LockToken>, SharedCacheError> {
        let holder = random_hex();
        let ttl_ms = ttl_millis(self.lock_ttl);
        let mut set = redis::cmd("SET");
        set.arg(lock_key)
            .arg(&holder)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms);
        let mut connection = self.connection()?;
        let taken: Option<String> = self
            .call_as(attempt, set.query_async(&mut connection))
            .await?;
        Ok(taken.map(|_| LockToken(holder)))
    }

    /// Releases a lock if it still holds `lock`'s value.
    async fn release_lock(
        &self,
        lock_key: String,
        lock: LockToken,
    ) -> Result<(), SharedCacheError> {
        let mut connection = self.connection()?;
        let mut invocation = self.unlock.key(lock_key);
        invocation.arg(lock.0);
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    async fn delete(
        &self,
        key: &SharedKey,
        only: Option<TokenDigest>,
    ) -> Result<(), SharedCacheError> {
        let digest = only.map(|d| d.to_hex()).unwrap_or_default();
        let message = format!("deleted {} {} {digest}", self.origin, key.to_hex());
        let mut connection = self.connection()?;
        let mut invocation = self.delete.key(self.token_key(key));
        invocation.key(self.tombstone_key(key));
        invocation
            .arg(digest)
            .arg(&self.channel)
            .arg(message.trim_end())
            .arg(ttl_millis(TOMBSTONE_TTL));
        self.call(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    /// What the level holds for each of `keys` (at most [`ENTRY_BATCH`] per call): the digest
    /// of the stored token, else what a deletion named. Read without opening the values.
    async fn entries(&self, keys: &[SharedKey]) -> Result<Vec<SharedEntry>, SharedCacheError> {
        let mut all = Vec::with_capacity(keys.len());
        for batch in keys.chunks(ENTRY_BATCH) {
            let values = self.entry_values(batch).await?;
            let digest = |hex: &[u8]| {
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(TokenDigest::from_hex)
            };
            for pair in values.chunks(2) {
                all.push(match pair {
                    [Some(value), _] => value
                        .get(cipher::DIGEST_RANGE)
                        .and_then(digest)
                        .map_or(SharedEntry::Absent, SharedEntry::Stored),
                    [None, Some(tombstone)] if tombstone.as_slice() == b"*" => {
                        SharedEntry::Deleted(None)
                    }
                    [None, Some(tombstone)] => digest(tombstone)
                        .map_or(SharedEntry::Absent, |token| {
                            SharedEntry::Deleted(Some(token))
                        }),
                    _ => SharedEntry::Absent,
                });
            }
        }
        Ok(all)
    }
}

/// `PING`s Redis every second to mark the level up or down, until the cache is dropped.
async fn probe(inner: Weak<Inner>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(error) = inner.connections.follow_master().await {
            // With a master known, sentinels that do not answer (a rolling restart) are no
            // reason to stop using it: logged, and the master is probed as usual.
            if inner.connections.current().is_none() {
                inner.fail(&SharedCacheError::Backend(error));
                continue;
            }
            inner.sentinels_failing(&error);
        }
        let Ok(mut connection) = inner.connection() else {
            continue;
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(inner.timeout, ping.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => inner.recover(),
            Ok(Err(error)) => inner.fail(&SharedCacheError::Backend(error.to_string())),
            Err(_) => inner.fail(&SharedCacheError::Timeout(inner.timeout)),
        }
    }
}

impl SharedCache for RedisCache {
    fn load<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, Option<SharedToken>> {
        Box::pin(self.inner.load(key))
    }

    fn entries<'a>(&'a self, keys: &'a [SharedKey]) -> SharedFuture<'a, Vec<SharedEntry>> {
        Box::pin(self.inner.entries(keys))
    }

    fn store<'a>(
        &'a self,
        key: &'a SharedKey,
        token: &'a CachedToken,
        ttl: Duration,
    ) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.store(key, token, ttl))
    }

    fn try_lock<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, Option<LockToken>> {
        Box::pin(self.inner.try_lock(key))
    }

    fn unlock<'a>(&'a self, key: &'a SharedKey, lock: LockToken) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.release_lock(self.inner.lock_key(key), lock))
    }

    fn delete<'a>(&'a self, key: &'a SharedKey, only: Option<TokenDigest>) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.delete(key, only))
    }

    fn load_secret<'a>(&'a self, key: &'a SharedKey) -> SharedFuture<'a, SharedSecret> {
        Box::pin(self.inner.load_secret(key))
    }

    fn store_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        secret: &'a RotatedSecret,
    ) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.store_secret(key, secret))
    }

    fn restore_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        secret: &'a RotatedSecret,
    ) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.restore_secret(key, secret))
    }

    fn drop_secret<'a>(
        &'a self,
        key: &'a SharedKey,
        fingerprint: &'a str,
        at: std::time::SystemTime,
    ) -> SharedFuture<'a, ()> {
        Box::pin(self.inner.drop_secret(key, fingerprint, at))
    }

    fn subscribe(&self) -> mpsc::Receiver<Invalidation> {
        let (sender, receiver) = mpsc::channel(INVALIDATION_QUEUE);
        tokio::spawn(subscriber::subscribe(Arc::downgrade(&self.inner), sender));
        receiver
    }

    fn status(&self) -> SharedCacheStatus {
        SharedCacheStatus {
            up: self.inner.up.load(Ordering::Relaxed),
            subscribed: self.inner.subscribed.load(Ordering::Relaxed),
            errors: self.inner.errors.load(Ordering::Relaxed),
            invalidations: self.inner.invalidations.load(Ordering::Relaxed),
            master_changes: self.inner.connections.master_changes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lua_scripts_read_the_fields_where_the_cipher_writes_them() {
        // Lua's string.sub is 1-based and inclusive.
        assert!(STORE_SCRIPT.contains(&format!(
            "string.sub(old, {}, {})",
            cipher::FETCHED_AT_RANGE.start + 1,
            cipher::FETCHED_AT_RANGE.end
        )));
        assert!(DELETE_SCRIPT.contains(&format!(
            "string.sub(old, {}, {})",
            cipher::DIGEST_RANGE.start + 1,
            cipher::DIGEST_RANGE.end
        )));
    }
}
