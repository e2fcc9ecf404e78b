//! `[shared_cache]`: the Redis level shared by replicas, as `config` validated it. The URL may
//! carry a password and the encryption keys are secret, so `Debug` shows neither.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretBox, SecretSlice, SecretString};

/// Length of a shared cache encryption key: AES-256.
pub const ENCRYPTION_KEY_LEN: usize = 32;

/// An AES-256 key for tokens in the shared cache; zeroed on drop, never printed.
pub type EncryptionKey = SecretBox<[u8; ENCRYPTION_KEY_LEN]>;

/// `[shared_cache]`: Redis as a second cache level shared by every replica.
pub struct SharedCacheSettings {
    /// Where Redis is: a URL, or the master that sentinels name.
    pub target: RedisTarget,
    /// Prefix of every Redis key and of the invalidation channel.
    pub key_prefix: String,
    /// The key new entries are encrypted with.
    pub encryption_key: EncryptionKey,
    /// A second key entries may be encrypted with, accepted for reading during a rotation.
    pub previous_encryption_key: Option<EncryptionKey>,
    /// Bound on each Redis call.
    pub timeout: Duration,
    /// How long the lock that keeps one IdP request per key across replicas lives at most.
    pub lock_ttl: Duration,
    /// How long a replica waits for a peer's IdP request before making its own.
    pub wait_for_peer: Duration,
    /// `[shared_cache.tls]`: the CA and client certificate of a `rediss://` connection.
    pub tls: Option<RedisTls>,
    /// The ACL user, when the URL names none (`shared_cache.username`).
    pub username: Option<String>,
    /// The ACL password, when the URL carries none (from `shared_cache.password_env`).
    pub password: Option<SecretString>,
}

/// Where the shared level's Redis is.
pub enum RedisTarget {
    /// `shared_cache.url`, `redis://[user:password@]host:port[/db]` (or `rediss://`); secret
    /// because it may carry a password.
    Url(SecretString),
    /// `shared_cache.sentinels` and `master_name`: the master is asked of the sentinels, and
    /// followed when they fail over.
    Sentinel(SentinelSettings),
    /// `shared_cache.cluster_nodes`: seed nodes of a Redis Cluster (or Valkey in cluster mode),
    /// `host:port`; the client discovers the others and follows slots and failovers.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Whether this is a Redis Cluster, whose keys carry hash tags.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// High-availability Redis behind Sentinel.
pub struct SentinelSettings {
    /// `host:port` of each sentinel, asked in order.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// The sentinels' ACL user, when they require one.
    pub username: Option<String>,
    /// The sentinels' password (from `shared_cache.sentinel_password_env`).
    pub password: Option<SecretString>,
}

impl RedisTarget {
    /// Whether `other` is the same place reached the same way.
    fn same_as(&self, other: &Self) -> bool {
        fn secret(secret: &Option<SecretString>) -> Option<&str> {
            secret.as_ref().map(|secret| secret.expose_secret())
        }
        match (self, other) {
            (Self::Url(a), Self::Url(b)) => a.expose_secret() == b.expose_secret(),
            (Self::Sentinel(a), Self::Sentinel(b)) => {
                a.sentinels == b.sentinels
                    && a.master_name == b.master_name
                    && a.username == b.username
                    && secret(&a.password) == secret(&b.password)
            }
            (Self::Cluster(a), Self::Cluster(b)) => a == b,
            _ => false,
        }
    }
}

/// `[shared_cache.tls]`, read from its files: PEM bytes.
pub struct RedisTls {
    /// The CA that signed the server's certificate, in place of the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The client certificate chain and its private key, for mutual TLS.
    pub client: Option<ClientIdentity>,
}

/// A client certificate and its key (secret), for mutual TLS.
pub struct ClientIdentity {
    /// The certificate chain, PEM.
    pub certificate_pem: Vec<u8>,
    /// The private key, PEM.
    pub key_pem: SecretSlice<u8>,
}

impl RedisTls {
    /// Whether `other` holds the same CA, certificate and key.
    fn same_as(&self, other: &Self) -> bool {
        fn client(tls: &RedisTls) -> Option<(&[u8], &[u8])> {
            tls.client.as_ref().map(|client| {
                (
                    client.certificate_pem.as_slice(),
                    client.key_pem.expose_secret(),
                )
            })
        }
        self.ca_pem == other.ca_pem && client(self) == client(other)
    }
}

impl SharedCacheSettings {
    /// Where the Redis server is, for logs (never a password): `host:port`, or the master's
    /// name and the sentinels.
    pub fn endpoint(&self) -> String {
        match &self.target {
            RedisTarget::Url(url) => redis_endpoint(url.expose_secret()),
            RedisTarget::Sentinel(sentinel) => format!(
                "master {} of sentinels {}",
                sentinel.master_name,
                sentinel.sentinels.join(",")
            ),
            RedisTarget::Cluster(nodes) => format!("cluster of seed nodes {}", nodes.join(",")),
        }
    }
}

impl SharedCacheSettings {
    /// Whether `other` is the same level (server or sentinels, database, TLS or not, prefix,
    /// keys, timings), whatever the credentials: a reload applies new credentials, while
    /// another place needs a restart.
    pub fn same_place(&self, other: &Self) -> bool {
        let key = |key: &EncryptionKey| *key.expose_secret();
        let place = match (&self.target, &other.target) {
            (RedisTarget::Url(a), RedisTarget::Url(b)) => {
                without_credentials(a.expose_secret()) == without_credentials(b.expose_secret())
            }
            (RedisTarget::Sentinel(a), RedisTarget::Sentinel(b)) => {
                a.sentinels == b.sentinels
                    && a.master_name == b.master_name
                    && a.username == b.username
                    && a.password.as_ref().map(|p| p.expose_secret())
                        == b.password.as_ref().map(|p| p.expose_secret())
            }
            (RedisTarget::Cluster(a), RedisTarget::Cluster(b)) => a == b,
            _ => false,
        };
        place
            && self.tls.is_some() == other.tls.is_some()
            && self.key_prefix == other.key_prefix
            && key(&self.encryption_key) == key(&other.encryption_key)
            && self.previous_encryption_key.as_ref().map(key)
                == other.previous_encryption_key.as_ref().map(key)
            && self.timeout == other.timeout
            && self.lock_ttl == other.lock_ttl
            && self.wait_for_peer == other.wait_for_peer
    }

    /// Whether `other` is the same level reached the same way: [`Self::same_place`], with the
    /// same credentials.
    pub fn same_as(&self, other: &Self) -> bool {
        self.same_place(other)
            && self.target.same_as(&other.target)
            && self.username == other.username
            && self.password.as_ref().map(|p| p.expose_secret())
                == other.password.as_ref().map(|p| p.expose_secret())
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => a.same_as(b),
                _ => false,
            }
    }
}

impl fmt::Debug for SharedCacheSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCacheSettings")
            .field("endpoint", &self.endpoint())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("wait_for_peer", &self.wait_for_peer)
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The `host:port` (or socket path) part of a Redis URL, without credentials.
/// A Redis URL without its user and password, to compare places; `None` when unparsable.
fn without_credentials(url: &str) -> Option<String> {
    let mut url = reqwest::Url::parse(url).ok()?;
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some(url.into())
}

fn redis_endpoint(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .map(|url| match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => url.path().to_owned(),
        })
        .unwrap_or_else(|| "[unparsable URL]".to_owned())
}
