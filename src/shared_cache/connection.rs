//! The connection to Redis: a client and a connection manager for `shared_cache.url`, or, behind
//! Sentinel, for the master the sentinels name, replaced when they name another.
//!
//! The redis crate's connection manager reconnects to the address it was made for; after a
//! failover that is a read-only replica, so following the master is done here: the health probe
//! asks the sentinels every second ([`Connections::follow_master`]), and when the master moved,
//! a new client and manager take the old ones' place and the subscriber is told to subscribe
//! again (then every cached entry is checked against the new master). Until the master is
//! known, calls fail as if the level were down, and the broker serves from memory and the IdP.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use redis::{ConnectionInfo, IntoConnectionInfo as _, RedisResult};
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};
use tokio::sync::watch;

use super::settings::{RedisTarget, RedisTls, SharedCacheSettings};

/// The connection calls go through: to one server, or to a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    /// One server (a URL, or the master the sentinels name), reconnecting by itself.
    Single(ConnectionManager),
    /// A cluster, routed by slot.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

/// One Redis server (or cluster) and how to reach it.
pub(super) struct Endpoint {
    /// For the subscriber's connection: the server, or each seed node of a cluster (tried in
    /// turn).
    pub(super) subscribe_to: Vec<redis::Client>,
    /// For calls.
    pub(super) connection: Connection,
    /// `host:port` (or the cluster's seeds), for logs.
    pub(super) address: String,
}

/// The sentinels and how to ask them.
struct Sentinels {
    master_name: String,
    /// One lazily connected manager per sentinel, asked in order.
    sentinels: Vec<(String, ConnectionManager)>,
}

/// The Redis connection in force, and where to find the next one.
pub(super) struct Connections {
    current: ArcSwapOption<Endpoint>,
    sentinels: Option<Sentinels>,
    /// To build a client for another master: TLS, user and password; replaced by a reload.
    credentials: ArcSwap<Credentials>,
    timeout: Duration,
    /// Counts master changes; the subscriber watches it (a reconnection with new credentials
    /// notifies it too) to subscribe again through the new connection.
    switched: watch::Sender<u64>,
}

/// How the broker authenticates to Redis: TLS material, user and password.
struct Credentials {
    tls: Option<TlsMaterial>,
    username: Option<String>,
    password: Option<SecretString>,
}

impl Credentials {
    fn of(settings: &SharedCacheSettings) -> Self {
        Self {
            tls: settings.tls.as_ref().map(TlsMaterial::of),
            username: settings.username.clone(),
            password: settings.password.clone(),
        }
    }
}

/// `[shared_cache.tls]` as the redis crate takes it (the key kept secret until a client is made).
struct TlsMaterial {
    ca_pem: Option<Vec<u8>>,
    client: Option<(Vec<u8>, SecretSlice<u8>)>,
}

impl TlsMaterial {
    fn of(tls: &RedisTls) -> Self {
        Self {
            ca_pem: tls.ca_pem.clone(),
            client: tls.client.as_ref().map(|client| {
                (
                    client.certificate_pem.clone(),
                    SecretSlice::from(client.key_pem.expose_secret().to_vec()),
                )
            }),
        }
    }
}

impl Connections {
    /// Prepares the connection (nothing is connected yet): to the URL, or to no server until
    /// the sentinels name the master.
    pub(super) fn new(settings: &SharedCacheSettings) -> RedisResult<Self> {
        let (switched, _) = watch::channel(0);
        let mut connections = Self {
            current: ArcSwapOption::empty(),
            sentinels: None,
            credentials: ArcSwap::from_pointee(Credentials::of(settings)),
            timeout: settings.timeout,
            switched,
        };
        match &settings.target {
            RedisTarget::Url(url) => {
                let info = url.expose_secret().into_connection_info()?;
                let endpoint = connections.endpoint(info, settings.endpoint())?;
                connections.current.store(Some(Arc::new(endpoint)));
            }
            RedisTarget::Cluster(nodes) => {
                let endpoint = connections.cluster_endpoint(nodes, connections.timeout)?;
                connections.current.store(Some(Arc::new(endpoint)));
            }
            RedisTarget::Sentinel(sentinel) => {
                let sentinels = sentinel
                    .sentinels
                    .iter()
                    .map(|address| {
                        let mut info = connections.address_info(address)?;
                        info = with_credentials(
                            info,
                            sentinel.username.as_deref(),
                            sentinel.password.as_ref(),
                        );
                        let client = connections.client_for(info)?;
                        let manager = ConnectionManager::new_lazy_with_config(
                            client,
                            manager_config(connections.timeout),
                        )?;
                        Ok((address.clone(), manager))
                    })
                    .collect::<RedisResult<Vec<_>>>()?;
                connections.sentinels = Some(Sentinels {
                    master_name: sentinel.master_name.clone(),
                    sentinels,
                });
            }
        }
        Ok(connections)
    }

    /// The server in force, unless the master is not known yet.
    pub(super) fn current(&self) -> Option<Arc<Endpoint>> {
        self.current.load_full()
    }

    /// Masters moved to so far (the first one found included).
    pub(super) fn master_changes(&self) -> u64 {
        *self.switched.borrow()
    }

    /// Changes of the connection in force, for the subscriber to subscribe again on each.
    pub(super) fn switches(&self) -> watch::Receiver<u64> {
        self.switched.subscribe()
    }

    /// Reconnects with the credentials (password, user, TLS files) of `settings`, which reach
    /// the same server or sentinels: later calls and the subscription use them, and the level
    /// keeps its entries.
    pub(super) fn replace_credentials(&self, settings: &SharedCacheSettings) -> RedisResult<()> {
        let previous = self.credentials.swap(Arc::new(Credentials::of(settings)));
        let replaced = match (&settings.target, self.current.load_full()) {
            (RedisTarget::Url(url), _) => url
                .expose_secret()
                .into_connection_info()
                .and_then(|info| self.endpoint(info, settings.endpoint())),
            (RedisTarget::Cluster(nodes), _) => self.cluster_endpoint(nodes, self.timeout),
            (RedisTarget::Sentinel(_), Some(current)) => self
                .address_info(&current.address)
                .and_then(|info| self.endpoint(info, current.address.clone())),
            // No master known yet: the next one is reached with the new credentials.
            (RedisTarget::Sentinel(_), None) => return Ok(()),
        };
        match replaced {
            Ok(endpoint) => {
                self.current.store(Some(Arc::new(endpoint)));
                // Not a master change: the count stays, the subscriber is told.
                self.switched.send_modify(|_| {});
                Ok(())
            }
            Err(error) => {
                self.credentials.store(previous);
                Err(error)
            }
        }
    }

    /// Asks the sentinels (in order, the first that names a master) where the master is, and
    /// moves to it when it is not the one in force. Nothing to do without sentinels. The error
    /// says what each sentinel answered: unreachable, or no master of that name.
    pub(super) async fn follow_master(&self) -> Result<(), String> {
        let Some(sentinels) = &self.sentinels else {
            return Ok(());
        };
        let mut errors = Vec::new();
        for (address, manager) in &sentinels.sentinels {
            let mut manager = manager.clone();
            let mut ask = redis::cmd("SENTINEL");
            ask.arg("get-master-addr-by-name")
                .arg(&sentinels.master_name);
            let ask = ask.query_async::<Option<(String, u16)>>(&mut manager);
            match tokio::time::timeout(self.timeout, ask).await {
                Ok(Ok(Some((host, port)))) => return self.move_to(&host, port).await,
                Ok(Ok(None)) => errors.push(format!(
                    "sentinel {address} knows no master named {} (check shared_cache.master_name)",
                    sentinels.master_name
                )),
                Ok(Err(error)) => errors.push(format!("sentinel {address}: {error}")),
                Err(_) => errors.push(format!("sentinel {address} did not answer in time")),
            }
        }
        Err(errors.join("; "))
    }

    /// Makes `host:port` the server in force, unless it is already, or unless it says it is not
    /// a master (a sentinel that has not seen the failover yet names the demoted one). A server
    /// that does not answer `ROLE` (an ACL without it) is taken at the sentinels' word.
    async fn move_to(&self, host: &str, port: u16) -> Result<(), String> {
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|current| current.address == address)
        {
            return Ok(());
        }
        let endpoint = self
            .address_info(&address)
            .and_then(|info| self.endpoint(info, address.clone()))
            .map_err(|error| format!("cannot use the master at {address}: {error}"))?;
        let mut connection = endpoint.connection.clone();
        let ask = redis::cmd("ROLE");
        let role = ask.query_async::<Vec<redis::Value>>(&mut connection);
        if let Ok(Ok(role)) = tokio::time::timeout(self.timeout, role).await
            && let Some(role) = role_of(&role)
            && role != "master"
        {
            return Err(format!(
                "the sentinels name {address} as the master, but it says it is a {role}"
            ));
        }
        let first = self.current.swap(Some(Arc::new(endpoint))).is_none();
        tracing::info!(
            master = %address,
            "{}",
            if first {
                "shared cache (Redis) master found through the sentinels"
            } else {
                "shared cache (Redis) master moved (a failover); following it"
            }
        );
        self.switched.send_modify(|switches| *switches += 1);
        Ok(())
    }

    /// The connection details of `host:port`: TLS when `[shared_cache.tls]` is set.
    pub(super) fn address_info(&self, address: &str) -> RedisResult<ConnectionInfo> {
        let scheme = if self.credentials.load().tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{address}").into_connection_info()
    }

    /// A client and a lazy connection manager for `info`, with the settings' user and password
    /// when the URL named none.
    fn endpoint(&self, info: ConnectionInfo, address: String) -> RedisResult<Endpoint> {
        let client = self.client_for(self.with_settings_credentials(info))?;
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config(self.timeout))?;
        Ok(Endpoint {
            subscribe_to: vec![client],
            connection: Connection::Single(connection),
            address,
        })
    }

    /// `info` with the settings' user and password: configuration refuses a user or password
    /// both in the URL and in the settings, so those of the settings complete the URL's.
    pub(super) fn with_settings_credentials(&self, info: ConnectionInfo) -> ConnectionInfo {
        let credentials = self.credentials.load();
        with_credentials(
            info,
            credentials.username.as_deref(),
            credentials.password.as_ref(),
        )
    }

    /// `[shared_cache.tls]`'s CA and client certificate, as the redis crate takes them.
    pub(super) fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        let credentials = self.credentials.load();
        let tls = credentials.tls.as_ref()?;
        Some(redis::TlsCertificates {
            client_tls: tls.client.as_ref().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert: client_cert.clone(),
                    client_key: client_key.expose_secret().to_vec(),
                }
            }),
            root_cert: tls.ca_pem.clone(),
        })
    }

    /// A client for `info`, with `[shared_cache.tls]`'s CA and client certificate when set
    /// (`rediss://` alone uses the system roots).
    pub(super) fn client_for(&self, info: ConnectionInfo) -> RedisResult<redis::Client> {
        match self.tls_certificates() {
            None => redis::Client::open(info),
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
        }
    }
}

/// The role a `ROLE` reply names first (`master`, `slave`, `sentinel`), when it names one.
fn role_of(reply: &[redis::Value]) -> Option<String> {
    match reply.first()? {
        redis::Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// Few, short reconnection attempts per call: the probe keeps calling every second.
fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

/// `info` with this user and password, where given.
fn with_credentials(
    info: ConnectionInfo,
    username: Option<&str>,
    password: Option<&SecretString>,
) -> ConnectionInfo {
    if username.is_none() && password.is_none() {
        return info;
    }
    let mut redis = info.redis_settings().clone();
    if let Some(username) = username {
        redis = redis.set_username(username);
    }
    if let Some(password) = password {
        redis = redis.set_password(password.expose_secret());
    }
    info.set_redis_settings(redis)
}
