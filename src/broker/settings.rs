//! `[cache]`: how the broker keeps and refreshes tokens.

use std::time::Duration;

use serde::Deserialize;

/// `[cache]`: how tokens are kept and refreshed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// Most keys held at once.
    pub max_entries: u64,
    /// Least validity a handed-out token has left; entries leave the cache this long before expiry.
    #[serde(with = "humantime_serde")]
    pub min_remaining: Duration,
    /// Last fraction of a token's life in which a background refresh starts.
    pub refresh_ahead: f64,
    /// How long an IdP rejection is remembered per key.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Within this of a key's last fetch, a `DELETE` marks the entry (it keeps serving, and the
    /// first request after the interval fetches) instead of forgetting it.
    #[serde(with = "humantime_serde")]
    pub min_refetch_interval: Duration,
}
