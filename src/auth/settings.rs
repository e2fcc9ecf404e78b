//! `[auth]` and `[callers.NAME]`: the admin and metrics keys, anonymous access, and each caller's
//! key hash, allow rules and limits, as `config` validated them.

use std::num::NonZeroU32;

use super::{AllowRule, KeyHash};

/// `[auth]`: the admin key and whether anonymous callers are served.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Hash of the key that guards `/v1/admin`; admin routes are closed without one.
    pub admin_key_sha256: Option<KeyHash>,
    /// Hash of the key that `/metrics` requires, when set; without one `/metrics` is open.
    pub metrics_key_sha256: Option<KeyHash>,
    /// Serve requests that carry no caller key (a sidecar on localhost).
    pub allow_anonymous: bool,
    /// IdP requests per minute a caller's requests may start, unless the caller sets its own.
    pub default_idp_requests_per_minute: NonZeroU32,
}

/// `[callers.NAME]`: one calling service.
#[derive(Debug, Clone)]
pub struct CallerSettings {
    /// Hash of the caller's key.
    pub key_sha256: KeyHash,
    /// What the caller may ask for.
    pub allow: Vec<AllowRule>,
    /// Requests per second the caller may make, when limited.
    pub rate_limit: Option<u32>,
    /// IdP requests per minute the caller's requests may start (misses on new keys, forced
    /// refetches, too-short tokens).
    pub idp_requests_per_minute: NonZeroU32,
    /// Most keys the caller's requests may create in the cache.
    pub max_keys: usize,
}

/// Keys a caller may create unless it sets `max_keys`.
pub const DEFAULT_MAX_KEYS: usize = 1000;
