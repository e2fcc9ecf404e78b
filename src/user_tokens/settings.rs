//! `[users]`: how user sessions (authorization-code flow) are kept.

use std::time::Duration;

use serde::Deserialize;

/// `[users]`: how user sessions (authorization-code flow) are kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSettings {
    /// Most user sessions (handles) held at once; the least recently used go first.
    pub max_sessions: u64,
    /// How long an authorization URL's `state` can be redeemed for a handle.
    #[serde(with = "humantime_serde")]
    pub authorization_timeout: Duration,
    /// Most authorizations one caller may have pending (started, not yet redeemed or expired).
    pub max_pending_per_caller: usize,
    /// A handle nobody asked a token for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}
