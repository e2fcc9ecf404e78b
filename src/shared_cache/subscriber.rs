//! The subscription to other replicas' announcements: kept up with backoff, checked with
//! `PING`s (a half-open connection would otherwise stay silent), moved with the master, and
//! followed by [`Invalidation::Resubscribed`] each time it starts, since announcements sent
//! meanwhile are lost.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use rand::Rng as _;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use super::Inner;
use crate::token::{Invalidation, SharedCacheError, SharedKey, TokenDigest};

/// How often the subscriber checks its connection.
const SUBSCRIBER_PING_INTERVAL: Duration = Duration::from_secs(5);
/// First and longest wait between two subscription attempts.
const RESUBSCRIBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

impl Inner {
    fn set_subscribed(&self, subscribed: bool, why: &str) {
        if self.subscribed.swap(subscribed, Ordering::Relaxed) != subscribed {
            if subscribed {
                tracing::info!(endpoint = %self.endpoint, channel = %self.channel, "subscribed to shared cache invalidations");
            } else {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    reason = why,
                    "not subscribed to shared cache invalidations: other replicas' changes reach this one only at expiry until it resubscribes"
                );
            }
        }
    }

    /// Moves the subscriber to the next seed of a cluster after a subscription failed or was
    /// lost, whatever the cause (refused, silent, dropped): the node may be gone.
    fn next_subscriber_node(&self) {
        self.subscriber_turn.fetch_add(1, Ordering::Relaxed);
    }

    /// Parses an announcement; `None` for this process's own and for unknown lines.
    fn parse(&self, message: &[u8]) -> Option<Invalidation> {
        let text = std::str::from_utf8(message).ok()?;
        let mut fields = text.split(' ');
        let (kind, origin, key) = (fields.next()?, fields.next()?, fields.next()?);
        if origin == self.origin {
            return None;
        }
        let key = SharedKey::from_hex(key)?;
        let digest = fields.next().map(TokenDigest::from_hex);
        match (kind, digest) {
            ("stored", Some(Some(token))) => Some(Invalidation::Stored { key, token }),
            ("deleted", None) => Some(Invalidation::Deleted { key, token: None }),
            ("secret", None) => Some(Invalidation::SecretChanged { key }),
            ("deleted", Some(Some(token))) => Some(Invalidation::Deleted {
                key,
                token: Some(token),
            }),
            _ => None,
        }
    }

    async fn connect_subscriber(&self) -> Result<(PubSubSink, PubSubStream), SharedCacheError> {
        let subscribe = async {
            let endpoint = self.connections.current().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::Io, "the master is not known yet"))
            })?;
            // A cluster's seeds in turn, moving on from one that failed.
            let turn = self.subscriber_turn.load(Ordering::Relaxed);
            let client = endpoint
                .subscribe_to
                .get(turn % endpoint.subscribe_to.len().max(1))
                .ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no node to subscribe on"))
                })?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub.split())
        };
        match tokio::time::timeout(self.timeout, subscribe).await {
            Ok(Ok(split)) => Ok(split),
            Ok(Err(error)) => Err(SharedCacheError::Backend(error.to_string())),
            Err(_) => Err(SharedCacheError::Timeout(self.timeout)),
        }
    }
}

/// Keeps a subscription to the invalidation channel and forwards other replicas' announcements
/// to `events`, reconnecting with backoff, until the receiver is dropped.
pub(super) async fn subscribe(inner: Weak<Inner>, events: mpsc::Sender<Invalidation>) {
    let mut backoff = RESUBSCRIBE_BACKOFF.0;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        // Taken before subscribing, so a master change during the subscription is not missed.
        let switches = strong.connections.switches();
        let recoveries = strong.recoveries.subscribe();
        match strong.connect_subscriber().await {
            Ok((sink, stream)) => {
                strong.set_subscribed(true, "");
                backoff = RESUBSCRIBE_BACKOFF.0;
                // Announcements sent before this subscription may have been missed.
                if events.send(Invalidation::Resubscribed).await.is_err() {
                    return;
                }
                let lost = forward(&strong, sink, stream, (switches, recoveries), &events).await;
                if events.is_closed() {
                    return;
                }
                strong.next_subscriber_node();
                strong.set_subscribed(false, lost);
            }
            Err(error) => {
                strong.set_subscribed(false, &error.to_string());
                strong.next_subscriber_node();
            }
        }
        drop(strong);
        // Full jitter, so replicas do not reconnect in step after a Redis restart.
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            () = events.closed() => return,
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF.1);
    }
}

/// Forwards announcements until the connection is lost (the reason is returned) or the
/// receiver is dropped.
async fn forward(
    inner: &Inner,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    (mut switches, mut recoveries): (
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Receiver<u64>,
    ),
    events: &mpsc::Sender<Invalidation>,
) -> &'static str {
    let mut pings = tokio::time::interval(SUBSCRIBER_PING_INTERVAL);
    pings.tick().await;
    loop {
        tokio::select! {
            () = events.closed() => return "shutting down",
            _ = switches.changed() => return "the connection was replaced (a failover, or new credentials)",
            // Calls fail while the level is down, so the check after this subscription may
            // have stopped short: it runs again once calls succeed.
            _ = recoveries.changed() => {
                if events.send(Invalidation::Resubscribed).await.is_err() {
                    return "shutting down";
                }
            }
            message = stream.next() => {
                let Some(message) = message else {
                    return "connection closed";
                };
                if let Some(event) = inner.parse(message.get_payload_bytes()) {
                    inner.invalidations.fetch_add(1, Ordering::Relaxed);
                    if events.send(event).await.is_err() {
                        return "shutting down";
                    }
                }
            }
            _ = pings.tick() => {
                let ping = sink.ping::<redis::Value>();
                if !matches!(tokio::time::timeout(inner.timeout, ping).await, Ok(Ok(_))) {
                    return "no answer to PING";
                }
            }
        }
    }
}
