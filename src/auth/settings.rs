//! `[auth]` and `[callers.NAME]`: the admin and metrics keys, anonymous access, and each caller's
//! key hash, allow rules and limits, as `config` validated them.

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
}
