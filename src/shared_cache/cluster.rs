//! Redis Cluster (and Valkey in cluster mode): the redis crate's cluster client routes each call
//! to the node that owns its key's slot, follows `MOVED` and `ASK`, refreshes the topology and
//! splits a multi-key read (`MGET`) by slot; the broker's part is to keep every key one script
//! touches in one slot (hash tags, see the module above) and to reach the same calls through one
//! [`Connection`], whatever the topology.
//!
//! Announcements use classic pub/sub: a `PUBLISH` on any node reaches the subscribers of every
//! node, so the subscriber listens on one node (the seeds in turn, moving on when one fails) and
//! checks the cached entries after every subscription, as with one server.

use std::time::Duration;

use redis::RedisResult;
use redis::cluster::{ClusterClient, ClusterConfig};

use super::Inner;
use super::connection::{Connection, Connections, Endpoint};
use crate::token::{SharedCacheError, SharedKey};

impl Connections {
    /// The cluster of seed `nodes` (`host:port`), with the settings' TLS, user and password: a
    /// cluster connection made in the background (a cluster down at start is used once it
    /// answers), and a client per seed for the subscriber.
    pub(super) fn cluster_endpoint(
        &self,
        nodes: &[String],
        timeout: Duration,
    ) -> RedisResult<Endpoint> {
        // The client takes the user and password of the first seed for every node.
        let infos = nodes
            .iter()
            .map(|node| Ok(self.with_settings_credentials(self.address_info(node)?)))
            .collect::<RedisResult<Vec<_>>>()?;
        let mut builder = ClusterClient::builder(infos.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(certificates) = self.tls_certificates() {
            builder = builder.certs(certificates);
        }
        let client = builder.build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        let connection = client.get_pending_async_connection_with_config(config);
        let subscribe_to = infos
            .into_iter()
            .map(|info| self.client_for(info))
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(Endpoint {
            subscribe_to,
            connection: Connection::Cluster(connection),
            address: format!("cluster {}", nodes.join(",")),
        })
    }
}

impl Inner {
    /// The token and tombstone values of each of `keys`, in order (two per key). One `MGET` on
    /// one server; on a cluster one `MGET` per key, whose two keys share a slot, all at once (a
    /// cluster splits a multi-slot `MGET` itself, but not reliably across a failover).
    pub(super) async fn entry_values(
        &self,
        keys: &[SharedKey],
    ) -> Result<Vec<Option<Vec<u8>>>, SharedCacheError> {
        let mget = |keys: &[SharedKey]| {
            let mut mget = redis::cmd("MGET");
            for key in keys {
                mget.arg(self.token_key(key)).arg(self.tombstone_key(key));
            }
            mget
        };
        if !self.cluster {
            let mut connection = self.connection()?;
            return self.call(mget(keys).query_async(&mut connection)).await;
        }
        let connection = self.connection()?;
        let calls = keys.iter().map(|key| {
            let (mut connection, mget) = (connection.clone(), mget(std::slice::from_ref(key)));
            async move {
                self.call(mget.query_async::<Vec<Option<Vec<u8>>>>(&mut connection))
                    .await
            }
        });
        let answers = futures_util::future::try_join_all(calls).await?;
        Ok(answers.into_iter().flatten().collect())
    }
}
